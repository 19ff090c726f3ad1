"""Models as users name them: Hub names served by a loopback Hub and fetched by the real huggingface_hub client
into a temporary cache, cache snapshot folders read in place, and ``model+adapter`` equal to peft's merge."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from fake_hub import TOKEN, FakeHub, SilentServer
from weightsmith.checkpoint import Checkpoint


def cli(tmp_path: Path, hub_url: str, *args: str, **env: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "WEIGHTSMITH_OFFLINE_BY_DEFAULT",
                                                               "HF_TOKEN")}
    clean.update({"HF_ENDPOINT": hub_url, "HF_HOME": str(tmp_path / "hf-home"), "HF_HUB_DISABLE_XET": "1",
                  "NO_PROXY": "127.0.0.1", "WEIGHTSMITH_CACHE": str(tmp_path / "ws-cache"),
                  "HF_HUB_DOWNLOAD_TIMEOUT": "20", **env})
    return subprocess.run([sys.executable, "-m", "weightsmith", *map(str, args)], env=clean, capture_output=True,
                          text=True, timeout=180)


def one_error_line(proc: subprocess.CompletedProcess, *words: str) -> str:
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    for w in words:
        assert w in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A base, two fine-tunes and a peft LoRA adapter of the base, as folders."""
    from weightsmith.zoo.synthetic import random_llama

    root = tmp_path_factory.mktemp("refs")
    base = random_llama(root / "base", seed=0)
    fts = [random_llama(root / f"ft{i}", seed=i) for i in (1, 2)]
    return {"base": base, "ft1": fts[0], "ft2": fts[1], "root": root}


def write_adapter(base: Path, out: Path, *, seed: int = 3, dtype=torch.float32, **lora) -> Path:
    """A peft LoRA adapter of ``base`` with random (non-zero) B, saved by peft itself."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype)
    peft_model = get_peft_model(model, LoraConfig(**{"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"],
                                                     **lora}))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name or "lora_embedding_B" in name:
                p.normal_(0, 0.05)
    peft_model.save_pretrained(out)
    return out


def peft_merged(base: Path, adapter: Path, dtype=torch.float32) -> dict[str, torch.Tensor]:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=dtype), adapter)
    return {k: v.detach() for k, v in model.merge_and_unload().state_dict().items()}


@pytest.mark.parametrize("lora, dtype", [
    ({}, torch.float32),
    ({"use_rslora": True, "target_modules": ["q_proj", "down_proj", "embed_tokens"], "alpha_pattern": {"down_proj": 3},
      "rank_pattern": {"down_proj": 2}, "modules_to_save": ["lm_head"]}, torch.float32),
    ({"target_modules": ["k_proj", "gate_proj", "up_proj"], "lora_alpha": 16}, torch.bfloat16),
])
def test_model_plus_adapter_equals_peft_merge_and_unload(models, tmp_path, lora, dtype, monkeypatch):
    from weightsmith.checkpoint.sources import resolve_model
    from weightsmith.zoo.synthetic import random_llama

    monkeypatch.setenv("WEIGHTSMITH_CACHE", str(tmp_path / "cache"))
    base = models["base"] if dtype == torch.float32 else random_llama(tmp_path / "bf16", seed=5, torch_dtype="bfloat16")
    if dtype == torch.bfloat16:  # stored in bf16, as users store them
        from transformers import AutoModelForCausalLM
        AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16).save_pretrained(base)
    adapter = write_adapter(base, tmp_path / "adapter", dtype=dtype, **lora)
    folder = resolve_model(f"{base}+{adapter}")
    assert folder != base and not (Path(base) / "adapter_model.safetensors").exists()
    ours = Checkpoint(folder)
    reference = peft_merged(base, adapter, dtype)
    changed = 0
    for name, expected in reference.items():
        if name not in ours:
            assert name == "lm_head.weight" and (ours.config or {}).get("tie_word_embeddings")
            continue
        got = ours.get(name)
        assert got.dtype == expected.dtype and torch.equal(got, expected), name
        changed += not torch.equal(got, Checkpoint(base).get(name))
    assert changed >= 2 * 2  # the adapter really changed weights (two layers, two modules or more)
    assert resolve_model(f"{base}+{adapter}") == folder  # built once, then reused


def test_model_plus_adapter_refusals_name_the_problem(models, tmp_path, monkeypatch):
    from weightsmith.checkpoint.sources import resolve_model
    from weightsmith.errors import WeightsmithError
    from weightsmith.zoo.synthetic import random_llama

    monkeypatch.setenv("WEIGHTSMITH_CACHE", str(tmp_path / "cache"))
    adapter = write_adapter(models["base"], tmp_path / "adapter")
    wider = random_llama(tmp_path / "wider", seed=0, hidden_size=64)
    with pytest.raises(WeightsmithError, match="trained on another model"):
        resolve_model(f"{wider}+{adapter}")
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True}))
    with pytest.raises(WeightsmithError, match="DoRA"):
        resolve_model(f"{models['base']}+{adapter}")
    (adapter / "adapter_config.json").write_text(json.dumps({**cfg, "peft_type": "IA3"}))
    with pytest.raises(WeightsmithError, match="only LoRA"):
        resolve_model(f"{models['base']}+{adapter}")
    with pytest.raises(WeightsmithError, match="not a peft adapter folder"):
        resolve_model(f"{models['base']}+{models['ft1']}")


def test_every_reference_form_resolves_through_the_real_client(models, tmp_path):
    with FakeHub(lifetime=170) as hub:
        sha_main = hub.serve("acme/base", models["base"])
        sha_v2 = hub.serve("acme/base", models["ft1"], revision="v2")
        adapter = write_adapter(models["base"], tmp_path / "adapter")
        hub.serve("acme/base-lora", adapter)
        results = {}
        for ref in ("acme/base", "acme/base@v2", f"acme/base@{sha_main}", "acme/base+acme/base-lora",
                    f"{models['base']}+acme/base-lora"):
            proc = cli(tmp_path, hub.url, "download", ref, "--json")
            assert proc.returncode == 0, proc.stderr[-2000:]
            results[ref] = json.loads(proc.stdout)
    assert results["acme/base"]["pinned"] == f"acme/base@{sha_main}"
    assert Path(results["acme/base"]["folder"]).name == sha_main
    assert results["acme/base@v2"]["pinned"] == f"acme/base@{sha_v2}"
    assert results[f"acme/base@{sha_main}"]["folder"] == results["acme/base"]["folder"]
    snapshot = Path(results["acme/base"]["folder"])
    assert snapshot.parent.name == "snapshots" and (snapshot / "config.json").is_symlink()  # the real cache layout
    for name in Checkpoint(models["base"]).names():
        assert torch.equal(Checkpoint(snapshot).get(name), Checkpoint(models["base"]).get(name))
    applied = Checkpoint(results["acme/base+acme/base-lora"]["folder"])
    assert torch.equal(applied.get("model.layers.0.self_attn.q_proj.weight"),
                       peft_merged(models["base"], adapter)["model.layers.0.self_attn.q_proj.weight"])
    local_base = Checkpoint(results[f"{models['base']}+acme/base-lora"]["folder"])  # a local base, a Hub adapter
    assert all(torch.equal(local_base.get(n), applied.get(n)) for n in applied.names())
    # the snapshot folder is read in place by every command, and offline the names resolve from the cache
    proc = cli(tmp_path, "http://127.0.0.1:9", "inspect", snapshot, "--json")
    assert proc.returncode == 0 and json.loads(proc.stdout)["params"] == Checkpoint(models["base"]).num_params
    proc = cli(tmp_path, "http://127.0.0.1:9", "inspect", "acme/base@v2", "--json", HF_HUB_OFFLINE="1")
    assert proc.returncode == 0, proc.stderr[-2000:]
    proc = cli(tmp_path, "http://127.0.0.1:9", "inspect", "acme/base", "--json", "--offline")
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_hub_errors_are_one_line(models, tmp_path):
    (tmp_path / "bin").mkdir()
    torch.save({"w": torch.zeros(2)}, tmp_path / "bin" / "pytorch_model.bin")
    (tmp_path / "bin" / "config.json").write_text("{}")
    code = {p.name: p.read_bytes() for p in models["base"].iterdir() if p.is_file()}
    code["config.json"] = json.dumps({**json.loads(code["config.json"]),
                                      "auto_map": {"AutoModelForCausalLM": "modeling_x.XForCausalLM"}}).encode()
    code["modeling_x.py"] = b"raise SystemExit('custom code ran')\n"
    with FakeHub(lifetime=170) as hub:
        hub.serve("acme/base", models["base"])
        hub.serve("acme/gated", models["base"], gated=True)
        hub.serve("acme/pickled", tmp_path / "bin")
        hub.serve("acme/custom", code)
        one_error_line(cli(tmp_path, hub.url, "inspect", "acme/nope"), "acme/nope", "no model repo", "HF_TOKEN")
        one_error_line(cli(tmp_path, hub.url, "inspect", "acme/base@nope"), "no revision 'nope'")
        one_error_line(cli(tmp_path, hub.url, "eval", "acme/gated", "--data", __file__), "gated", "hf auth login")
        proc = cli(tmp_path, hub.url, "download", "acme/gated", "--json", HF_TOKEN=TOKEN)
        assert proc.returncode == 0, proc.stderr[-2000:]
        one_error_line(cli(tmp_path, hub.url, "inspect", "acme/pickled"), "pickle", "--allow-pickle")
        line = one_error_line(cli(tmp_path, hub.url, "analyze", "acme/custom", "--data", __file__),
                              "auto_map", "--trust-remote-code")
        assert "custom code ran" not in line
        assert not list((tmp_path / "hf-home").rglob("modeling_x.py"))  # code is not even fetched untrusted
        one_error_line(cli(tmp_path, hub.url, "inspect", "acme/base", "--offline"), "not in the Hugging Face cache",
                       "weightsmith download acme/base")
    with SilentServer(lifetime=60) as silent:
        one_error_line(cli(tmp_path, silent.url, "inspect", "acme/base", HF_HUB_DOWNLOAD_TIMEOUT="2"),
                       "did not answer within 2 s")
    one_error_line(cli(tmp_path, "http://127.0.0.1:9", "inspect", "acme/base"), "cannot reach the Hub")


def test_a_cache_snapshot_links_only_into_its_own_blobs(models, tmp_path):
    with FakeHub(lifetime=120) as hub:
        hub.serve("acme/base", models["base"])
        hub.serve("acme/other", models["ft1"])
        for ref in ("acme/base", "acme/other"):
            assert cli(tmp_path, hub.url, "download", ref).returncode == 0
    cache = tmp_path / "hf-home" / "hub"
    snap = next((cache / "models--acme--base" / "snapshots").iterdir())
    other_blob = next((cache / "models--acme--other" / "blobs").iterdir())
    victims = {"config.json": "/etc/passwd", "tokenizer_config.json": str(other_blob),
               "model.safetensors": str(next((cache / "models--acme--other" / "snapshots").iterdir()) /
                                        "model.safetensors")}
    for name, target in victims.items():
        original = os.readlink(snap / name) if os.path.lexists(snap / name) else None
        (snap / name).unlink(missing_ok=True)
        os.symlink(target, snap / name)
        proc = cli(tmp_path, "http://127.0.0.1:9", "inspect", snap)
        one_error_line(proc, name, "outside the model folder")
        (snap / name).unlink()
        if original is not None:
            os.symlink(original, snap / name)
    assert cli(tmp_path, "http://127.0.0.1:9", "inspect", snap).returncode == 0


def test_a_recipe_of_hub_names_runs_online_then_offline_and_pins_what_it_read(models, tmp_path):
    recipe = {"merge_method": "ties", "base_model": "acme/base",
              "models": [{"model": "acme/ft-a", "parameters": {"weight": 0.5, "density": 0.5}},
                         {"model": {"model": "acme/ft-b", "lora": "acme/lora"}, "parameters": {"weight": 0.5,
                                                                                                "density": 0.5}}],
              "dtype": "float32"}
    path = tmp_path / "recipe.yml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    with FakeHub(lifetime=170) as hub:
        shas = {"acme/base": hub.serve("acme/base", models["base"]), "acme/ft-a": hub.serve("acme/ft-a", models["ft1"]),
                "acme/ft-b": hub.serve("acme/ft-b", models["ft2"]),
                "acme/lora": hub.serve("acme/lora", write_adapter(models["ft2"], tmp_path / "adapter"))}
        online = cli(tmp_path, hub.url, "merge", path, tmp_path / "online", "-q")
        assert online.returncode == 0, online.stderr[-2000:]
    offline = cli(tmp_path, "http://127.0.0.1:9", "merge", path, tmp_path / "offline", "-q", HF_HUB_OFFLINE="1")
    assert offline.returncode == 0, offline.stderr[-2000:]
    a, b = Checkpoint(tmp_path / "online"), Checkpoint(tmp_path / "offline")
    assert all(torch.equal(a.get(n), b.get(n)) for n in a.names())
    written = yaml.safe_load((tmp_path / "online" / "weightsmith_recipe.yaml").read_text())
    assert written["base_model"] == f"acme/base@{shas['acme/base']}"
    assert written["models"][0]["model"] == f"acme/ft-a@{shas['acme/ft-a']}"
    assert written["models"][1]["model"] == {"model": f"acme/ft-b@{shas['acme/ft-b']}",
                                             "lora": f"acme/lora@{shas['acme/lora']}"}
    card = (tmp_path / "online" / "README.md").read_text()
    meta = yaml.safe_load(card.split("---")[1])
    assert set(meta["base_model"]) == {"acme/base", "acme/ft-a", "acme/ft-b", "acme/lora"}
    assert meta["base_model_relation"] == "merge" and str(tmp_path) not in card.split("---")[1]
    # the written recipe reads the same bytes again
    again = cli(tmp_path, "http://127.0.0.1:9", "merge", tmp_path / "online" / "weightsmith_recipe.yaml",
                tmp_path / "again", "-q", HF_HUB_OFFLINE="1")
    assert again.returncode == 0, again.stderr[-2000:]
    c = Checkpoint(tmp_path / "again")
    assert all(torch.equal(a.get(n), c.get(n)) for n in a.names())


def test_a_pipeline_reads_hub_names_and_its_skip_key_follows_the_commit(models, tmp_path):
    spec = {"name": "p", "stages": [{"name": "look", "stage": "inspect", "input": "acme/base"}]}
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(spec))
    with FakeHub(lifetime=170) as hub:
        hub.serve("acme/base", models["base"])
        first = cli(tmp_path, hub.url, "run", tmp_path / "p.yaml", "--workdir", tmp_path / "w", "--json")
        assert first.returncode == 0, first.stderr[-2000:]
        same = cli(tmp_path, hub.url, "run", tmp_path / "p.yaml", "--workdir", tmp_path / "w", "--json")
        hub.serve("acme/base", models["ft1"])  # main moves to a new commit
        moved = cli(tmp_path, hub.url, "run", tmp_path / "p.yaml", "--workdir", tmp_path / "w", "--json")
    events = {name: [json.loads(line)["event"] for line in proc.stdout.splitlines() if line.startswith("{")]
              for name, proc in (("same", same), ("moved", moved))}
    assert "stage_skipped" in events["same"] and "stage_done" not in events["same"], events
    assert "stage_done" in events["moved"] and "stage_skipped" not in events["moved"], events


def test_a_download_keeps_the_sentence_transformers_files_a_weightsmith_folder_holds_aside(models, tmp_path):
    from weightsmith.checkpoint.formats import ST_ASIDE

    files = {p.name: p.read_bytes() for p in models["base"].iterdir() if p.is_file()}
    aside = {f"{ST_ASIDE}/modules.json": b'[{"idx": 1, "name": "1", "path": "1_Pooling", "type": "x.Pooling"}]',
             f"{ST_ASIDE}/1_Pooling/config.json": b'{"pooling_mode_mean_tokens": true}'}
    with FakeHub(lifetime=120) as hub:
        hub.serve("acme/folded", {**files, **aside})
        proc = cli(tmp_path, hub.url, "download", "acme/folded", "--json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    folder = Path(json.loads(proc.stdout)["folder"])
    assert all((folder / name).read_bytes() == data for name, data in aside.items())
