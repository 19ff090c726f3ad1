"""weightsmith push against a local stand-in for the Hub API: what arrives must be the folder, byte for byte."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import yaml

from fake_hub import TOKEN, FakeHub
from weightsmith.checkpoint.hub import plan_push, push
from weightsmith.errors import WeightsmithError


def run_push(hub: FakeHub, tmp_path, *args: str, command: str = "push", **extra_env: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "WEIGHTSMITH_OFFLINE_BY_DEFAULT")}
    # The stand-in speaks the basic LFS transfer, which huggingface_hub uses when Xet is off.
    env.update({"HF_ENDPOINT": hub.url, "HF_TOKEN": TOKEN, "HF_HOME": str(tmp_path / "hf-home"),
                "HF_HUB_DISABLE_XET": "1", "NO_PROXY": "127.0.0.1", **extra_env})
    return subprocess.run([sys.executable, "-m", "weightsmith", command, *args], env=env, capture_output=True,
                          text=True, timeout=120)


@pytest.fixture
def model(tiny_llama, tmp_path):
    folder = tiny_llama("model")
    (folder / "tokenizer_config.json").write_text("{}")
    (folder / ".weightsmith-stage.json").write_text("{}")
    return folder


def test_push_uploads_every_file_and_a_generated_card_without_touching_the_folder(model, tmp_path):
    before = sorted(p.name for p in model.iterdir())
    with FakeHub() as hub:
        proc = run_push(hub, tmp_path, str(model), "alice/tiny", "--json", "-q")
        assert proc.returncode == 0 and proc.stderr == "", proc.stderr  # -q: huggingface_hub's upload bars too
        out = json.loads(proc.stdout)
        files = hub.repos["alice/tiny"]["branches"]["main"]
    assert sorted(p.name for p in model.iterdir()) == before  # nothing written into the user's folder
    expected = {p.name for p in model.iterdir()} - {".weightsmith-stage.json"} | {"README.md"}
    assert set(files) == expected
    for name in expected - {"README.md"}:
        assert files[name] == (model / name).read_bytes(), name
    assert ("PUT", next(p for m, p in hub.requests if p.startswith("/lfs-upload/"))) in hub.requests
    meta = yaml.safe_load(files["README.md"].decode().split("---")[1])
    assert meta["library_name"] == "transformers" and "weightsmith" in meta["tags"]
    assert out["repo_id"] == "alice/tiny" and out["commit"] and not hub.repos["alice/tiny"]["private"]
    assert {f["path"] for f in out["files"]} == expected


@pytest.fixture
def hub_env(monkeypatch, tmp_path):
    """In-process pushes: endpoint and token from the environment, as a user sets them; Xet off (see run_push)."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-stored-token"))
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    with FakeHub() as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        yield hub


def test_push_to_a_branch_of_a_private_repo_keeps_the_folders_own_card(model, hub_env):
    (model / "README.md").write_text("---\nlicense: mit\n---\n# mine\n")
    push(model, "alice/tiny", private=True, revision="dev")
    push(model, "alice/tiny", revision="dev")  # existing repo and branch are reused
    repo = hub_env.repos["alice/tiny"]
    assert repo["private"] and repo["branches"]["main"] == {}
    assert repo["branches"]["dev"]["README.md"] == b"---\nlicense: mit\n---\n# mine\n"
    assert repo["branches"]["dev"]["model.safetensors"] == (model / "model.safetensors").read_bytes()


def test_push_without_a_token_is_one_clear_error(model, hub_env, monkeypatch):
    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(WeightsmithError, match="HTTP 401.*HF_TOKEN"):
        push(model, "alice/tiny")
    assert not hub_env.repos


def test_dry_run_lists_files_with_sizes_and_sends_nothing(model):
    result = push(model, "alice/tiny", dry_run=True)
    sizes = {f["path"]: f["size"] for f in result["files"]}
    assert sizes["model.safetensors"] == (model / "model.safetensors").stat().st_size
    assert ".weightsmith-stage.json" not in sizes and "README.md" in sizes
    assert result["total_bytes"] == sum(sizes.values())
    assert not (model / "README.md").exists()


def test_push_refuses_invalid_folders(tiny_llama, tmp_path):
    no_config = tiny_llama("a")
    (no_config / "config.json").unlink()
    with pytest.raises(WeightsmithError, match="no config.json"):
        plan_push(no_config)
    sharded = tiny_llama("b")
    from weightsmith.checkpoint import Checkpoint, save_state_dict
    ckpt = Checkpoint(sharded)
    state = {n: ckpt.get(n) for n in ckpt.names()}
    out = tmp_path / "sharded"
    out.mkdir()
    shutil.copy(sharded / "config.json", out)
    save_state_dict(state, out, max_shard_size="100KB")
    shards = sorted(out.glob("*.safetensors"))
    assert len(shards) > 1
    shards[-1].unlink()
    with pytest.raises(WeightsmithError, match=shards[-1].name):
        push(out, "alice/tiny", dry_run=True)
    with pytest.raises(WeightsmithError, match="OWNER/NAME"):
        push(sharded, "not a repo", dry_run=True)


def test_push_respects_a_users_own_offline_setting(model, tmp_path):
    with FakeHub() as hub:
        proc = run_push(hub, tmp_path, str(model), "alice/tiny", HF_HUB_OFFLINE="1")
        assert proc.returncode == 2 and "HF_HUB_OFFLINE is set" in proc.stderr
        assert "alice/tiny" not in hub.repos


def test_an_endpoint_that_never_answers_is_one_line_after_the_timeout(model, tmp_path):
    from fake_hub import SilentServer

    before = sorted((p.name, p.stat().st_mtime_ns) for p in model.iterdir())
    with SilentServer(lifetime=60) as silent:
        proc = run_push(silent, tmp_path, str(model), "alice/tiny", "--timeout", "1", "-q")
        assert silent.accepted >= 1  # it connected, then waited for an answer that never came
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "did not answer within 1 s" in lines[0] and silent.url in lines[0]
    assert sorted((p.name, p.stat().st_mtime_ns) for p in model.iterdir()) == before


@pytest.mark.parametrize("value", ["0", "-3", "1e9"])
def test_push_refuses_a_timeout_out_of_range(model, tmp_path, value):
    with FakeHub() as hub:
        proc = run_push(hub, tmp_path, str(model), "alice/tiny", "--timeout", value)
        assert hub.requests == []
    assert proc.returncode == 2 and "--timeout" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_push_reads_nothing_outside_the_folder_and_no_fifo(model, tmp_path):
    """A side file symlinked out of the folder, or a FIFO, is refused in one line, not uploaded or waited on."""
    from cli_check import cli, refused, snapshot

    secret = tmp_path / "secret.txt"
    secret.write_text("not part of the model")
    (model / "notes.txt").symlink_to(secret)
    before = snapshot(model)
    line = refused(cli("push", model, "alice/tiny", "--dry-run"), "notes.txt", "outside the model folder")
    assert "not part of the model" not in line and snapshot(model) == before
    (model / "notes.txt").unlink()
    os.mkfifo(model / "pipe")
    refused(cli("push", model, "alice/tiny", "--dry-run"), "pipe")
    (model / "pipe").unlink()
    inside = model / "sub"
    inside.mkdir()
    (inside / "extra.txt").write_text("x")
    (model / "alias.txt").symlink_to(inside / "extra.txt")  # a symlink that stays inside is followed
    listed = {f["path"] for f in plan_push(model)["files"]}
    assert {"sub/extra.txt", "alias.txt"} <= listed


ANSWERS = {
    "an HTML page": (200, b"<html><body>Sign in to continue</body></html>", {"Content-Type": "text/html"}),
    "a redirect loop": (302, b"", {"Location": "{url}/again"}),
    "truncated JSON": (200, b'{"url": "http://x", "na', {"Content-Type": "application/json"}),
}


@pytest.mark.parametrize("answer", sorted(ANSWERS))
def test_an_endpoint_that_is_not_the_hub_is_one_line(model, tmp_path, answer):
    """push and a Hub download against a server that answers, but not as the Hub does."""
    from fake_hub import AnswerServer

    status, body, headers = ANSWERS[answer]
    with AnswerServer(status, body, headers) as server:
        procs = [(run_push(server, tmp_path, str(model), "alice/tiny", "-q"), "error: push to")]
        if answer == "an HTML page":  # downloads go through the same client: one of them is enough
            procs.append((run_push(server, tmp_path, "alice/tiny", command="download"), "error: model alice/tiny"))
        assert server.requests >= len(procs)
    for proc, start in procs:
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
        assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
        assert lines[0].startswith(start), lines[0]


# The Hub client retries a timed-out request with backoff, so each case takes 10-25 s: one runs in make test.
@pytest.mark.parametrize("case", [pytest.param("push, status line dripped", marks=pytest.mark.slow), "push, body dripped",
                                  pytest.param("download, status line dripped", marks=pytest.mark.slow)])
def test_a_server_that_drips_its_answer_is_cut_at_the_deadline(tmp_path, tiny_llama, case):
    """One byte every 0.2 s: every read gets data in time, so only a deadline on the whole request ends the call
    before the server gives up (60 s), with the timeout's own message."""
    from fake_hub import DripServer

    model = tiny_llama("m")
    with DripServer(interval=0.2, lifetime=60, body="body" in case) as server:
        if case.startswith("push"):
            proc = run_push(server, tmp_path, str(model), "alice/tiny", "--timeout", "1", "-q")
        else:
            proc = run_push(server, tmp_path, "alice/tiny", command="download", HF_HUB_DOWNLOAD_TIMEOUT="1")
        assert server.accepted >= 1
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "did not answer within 1 s" in lines[0] and server.url in lines[0]


def test_a_weightsmith_format_folder_is_pushed_only_when_asked(tiny_llama, tmp_path):
    """An RPS folder (hashed weights stock transformers would fill at random) is refused by push, naming the plain
    export and the option; with the option it is planned as it is."""
    from weightsmith.compressor.rps import compress_rps

    rps = tmp_path / "rps"
    compress_rps(tiny_llama("m"), rps, budget=0.5, device="cpu")
    with pytest.raises(WeightsmithError, match="weightsmith rps folder.*weightsmith export.*weightsmith_format"):
        push(rps, "alice/tiny", dry_run=True)
    plan = push(rps, "alice/tiny", dry_run=True, weightsmith_format=True)
    assert plan["format"] == "rps" and plan["dry_run"]
    proc = subprocess.run([sys.executable, "-m", "weightsmith", "push", str(rps), "alice/tiny", "--dry-run"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--weightsmith-format" in proc.stderr and "Traceback" not in proc.stderr
