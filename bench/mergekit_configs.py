"""Every recipe mergekit ships (examples/*.yml) or builds in its tests (test_basic_merges.py,
test_tokenizer.py, test_chat_template.py), run on small local stand-in models by mergekit 0.1.5 and by
``weightsmith merge --compat mergekit``; prints one row per recipe and the counts:

- reproduced: every tensor bit-equal or within 1e-6 (random methods: the same distribution: the
  share of entries left at the base and the mean |change| within 5 %), the same tensor names, the
  same vocabulary and layer count; or both refuse the recipe;
- different: accepted by both, output differs (the row says by how much);
- refused: weightsmith refuses what mergekit runs (the row gives weightsmith's one-line reason).

    .venv/bin/python bench/mergekit_configs.py [--work DIR] [--only SUBSTRING] [--json]

The stand-ins are random tiny models (Llama, Granite, GPT-2, LLaVA; hidden size 32, the GPT-2 768
wide only where a recipe needs its 12 layers) written once under --work; nothing is downloaded.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE_NAMES = {  # Hub names in mergekit's examples -> stand-in folder names
    "psmathur/orca_mini_v3_13b": "orca", "garage-bAInd/Platypus2-13B": "platy", "WizardLM/WizardLM-13B-V1.2": "wizard",
    "WizardLM/WizardMath-13B-V1.0": "wizmath", "TheBloke/Llama-2-13B-fp16": "llama2",
    "mistralai/Mistral-7B-Instruct-v0.2": "mistral_inst", "BioMistral/BioMistral-7B": "biomistral",
    "mistralai/Mistral-7B-v0.1": "mistral", "model_a": "model_a", "model_b": "model_b",
}
MIRROR = Path("/work/.mirror/arcee-ai+mergekit/repo")
RANDOM_METHODS = {"dare_ties", "dare_linear", "della", "della_linear"}


# -- stand-in models ---------------------------------------------------------------------------------

def _tokenizer(folder: Path, size: int, added: list[str]) -> None:
    import tokenizers
    from transformers import LlamaTokenizerFast

    names = ["<unk>", "<s>", "</s>"] + [f"_tok_{i}" for i in range(3, size)]
    spec = {"version": "1.0", "added_tokens": [],
            "model": {"type": "BPE", "vocab": {t: i for i, t in enumerate(names)}, "merges": []}}
    raw = folder / "raw-tokenizer.json"
    tokenizers.Tokenizer.from_str(json.dumps(spec)).save(str(raw))
    tok = LlamaTokenizerFast(tokenizer_file=str(raw))
    tok.add_tokens(added)
    raw.unlink()
    tok.save_pretrained(folder)


def build_models(work: Path) -> dict[str, str]:
    from transformers import (CLIPVisionConfig, GPT2Config, GPT2LMHeadModel, GraniteConfig, GraniteForCausalLM,
                              LlamaConfig, LlamaForCausalLM, LlavaConfig, LlavaForConditionalGeneration)

    def llama(vocab=64, layers=2):
        return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=48,
                                            num_attention_heads=16, num_hidden_layers=layers))

    makers = {
        **{n: (lambda: llama()) for n in ("model_a", "model_b", "model_c")},
        **{n: (lambda: llama(layers=40)) for n in ("orca", "platy", "wizard", "wizmath", "llama2")},
        **{n: (lambda: llama(layers=4)) for n in ("mistral_inst", "biomistral", "mistral")},
        **{n: (lambda: GraniteForCausalLM(GraniteConfig(vocab_size=64, hidden_size=32, intermediate_size=48,
                                                         num_attention_heads=2, num_key_value_heads=2,
                                                         num_hidden_layers=2))) for n in ("granite_a", "granite_b")},
        "gpt2_like": lambda: GPT2LMHeadModel(GPT2Config(n_embd=768, n_head=12, n_layer=12, n_positions=64,
                                                        vocab_size=512)),
        **{n: (lambda: LlavaForConditionalGeneration(LlavaConfig(
            vision_config=CLIPVisionConfig(image_size=32, patch_size=4, num_hidden_layers=2, num_attention_heads=2,
                                           hidden_size=64, intermediate_size=128),
            text_config=LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_attention_heads=16,
                                    num_hidden_layers=2), image_seq_length=16))) for n in ("vlm_a", "vlm_b", "vlm_c")},
        "tok_base": lambda: llama(64), "tok_chatml": lambda: llama(66), "tok_padded": lambda: llama(64),
        "chat_b": lambda: llama(64),
    }
    tokenizers_of = {"tok_base": (64, []), "tok_chatml": (64, ["<|im_start|>", "<|im_end|>"]),
                     "tok_padded": (64, [f"<UNUSED_{i}>" for i in range(4)])}
    out = {}
    for i, (name, make) in enumerate(makers.items()):
        folder = work / name
        out[name] = str(folder)
        if (folder / "config.json").is_file():
            continue
        torch.manual_seed(1000 + i)
        model = make()
        model.save_pretrained(folder, safe_serialization=True)
        if name.startswith("vlm"):
            # transformers 5 writes LLaVA under its legacy names (language_model.model.*), whose language model
            # mergekit 0.1.5 leaves out of its output; the stand-ins use the in-memory names both tools read
            from weightsmith.checkpoint import save_state_dict
            (folder / "model.safetensors").unlink()
            save_state_dict({k: v.contiguous() for k, v in model.state_dict().items()}, folder, "1GB")
        if name in tokenizers_of:
            _tokenizer(folder, *tokenizers_of[name])
    return out


# -- the recipes -----------------------------------------------------------------------------------

def example_recipes(m: dict[str, str]) -> dict[str, dict]:
    out = {}
    git = ["git", "-C", str(MIRROR)]
    names = subprocess.run(git + ["ls-tree", "--name-only", "HEAD", "examples/"], capture_output=True,
                           text=True, check=True).stdout.split()
    for path in sorted(n for n in names if n.endswith(".yml")):
        text = subprocess.run(git + ["show", f"HEAD:{path}"], capture_output=True, text=True, check=True).stdout
        for hub, local in sorted(EXAMPLE_NAMES.items(), key=lambda kv: -len(kv[0])):
            text = text.replace(hub, m[local])
        out[f"examples/{Path(path).stem}"] = yaml.safe_load(text)
    return out


def basic_recipes(m: dict[str, str]) -> dict[str, dict]:
    """The configurations mergekit's tests/test_basic_merges.py builds, in its order."""
    def two(a, b, method, base=None, params=None):
        cfg = {"merge_method": method, "models": [{"model": m[a], "parameters": {"weight": 0.6}},
                                                  {"model": m[b], "parameters": {"weight": 0.4}}], "dtype": "bfloat16"}
        if base:
            cfg["base_model"] = m[base]
        if params:
            cfg["parameters"] = params
        return cfg

    def shared(a, b, c, prefix):
        """The cases test_basic_merges.py runs on both the Llama and the LLaVA stand-ins."""
        rows = {f"{prefix}linear": two(a, b, "linear"),
                f"{prefix}slerp": {**two(a, b, "slerp", a), "parameters": {"t": 0.35}}}
        for base in (None, c):
            for row_wise in (False, True):
                for flatten in (False, True):
                    rows[f"{prefix}nuslerp base={bool(base)} row_wise={row_wise} flatten={flatten}"] = two(
                        a, b, "nuslerp", base, {"nuslerp_row_wise": row_wise, "nuslerp_flatten": flatten})
        zero = two(a, b, "nuslerp", c, {"nuslerp_row_wise": False, "nuslerp_flatten": False})
        zero["models"][0]["parameters"]["weight"] = -0.5
        zero["models"][1]["parameters"]["weight"] = 0.5
        rows[f"{prefix}nuslerp weights sum to zero"] = zero
        for method, params in (("task_arithmetic", None), ("breadcrumbs", None), ("ties", {"density": 0.3}),
                               ("dare_ties", {"density": 0.66})):
            rows[f"{prefix}{method}"] = two(a, b, method, c, params)
        rows[f"{prefix}model_stock"] = two(b, c, "model_stock", a)
        rows[f"{prefix}model_stock filter_wise"] = two(b, c, "model_stock", a, {"filter_wise": True})
        return rows

    r = {
        "granite copy": {"merge_method": "passthrough", "models": [{"model": m["granite_a"]}], "dtype": "bfloat16"},
        "granite linear": {"merge_method": "linear", "dtype": "bfloat16", "models": [
            {"model": m["granite_a"], "parameters": {"weight": 0.6}},
            {"model": m["granite_b"], "parameters": {"weight": 0.4}}]},
        "granite slerp": {"merge_method": "slerp", "base_model": m["granite_a"], "parameters": {"t": 0.5},
                          "dtype": "bfloat16", "models": [{"model": m["granite_a"]}, {"model": m["granite_b"]}]},
        "gpt2 copy": {"merge_method": "passthrough", "models": [{"model": m["gpt2_like"]}], "dtype": "bfloat16"},
        "gpt2 stack": {"merge_method": "passthrough", "dtype": "bfloat16",
                       "slices": [{"sources": [{"model": m["gpt2_like"], "layer_range": [0, 12]}]}] * 2},
        "passthrough scale": {"merge_method": "passthrough", "models": [{"model": m["model_a"], "parameters": {
            "scale": [{"filter": "o_proj", "value": 0}, {"value": 1}]}}]},
        **shared("model_a", "model_b", "model_c", ""),
        "sce": two("model_a", "model_b", "sce", "model_c", {"select_topk": 0.5}),
        "ram": two("model_a", "model_b", "ram", "model_c"),
        "ramplus_tl": two("model_a", "model_b", "ramplus_tl", "model_c", {"r": 0.05, "alpha": 1.0}),
        "multislerp": two("model_a", "model_b", "multislerp", "model_c"),
        "arcee_fusion": two("model_a", "model_b", "arcee_fusion", "model_a"),
        "nearswap": two("model_a", "model_b", "nearswap", "model_a", {"t": 0.0001}),
        "della": two("model_a", "model_b", "della", "model_c", {"density": 0.66, "epsilon": 0.05, "lambda": 0.5}),
        "della invalid epsilon": two("model_a", "model_b", "della", "model_c",
                                     {"density": 0.66, "epsilon": 1.35, "lambda": 0.5}),
        "karcher": two("model_a", "model_b", "karcher", "model_c", {"max_iter": 5, "tol": 1e-5}),
        **shared("vlm_a", "vlm_b", "vlm_c", "vlm "),
    }
    return {f"basic/{k}": v for k, v in r.items()}


def tokenizer_recipes(m: dict[str, str]) -> dict[str, dict]:
    """mergekit's tests/test_tokenizer.py and test_chat_template.py configurations."""
    three = [m["tok_base"], m["tok_padded"], m["tok_chatml"]]

    def cfg(models, method="linear", **extra):
        return {"merge_method": method, "base_model": m["tok_base"], "dtype": "float32",
                "models": [{"model": x, "parameters": {"weight": 1.0}} for x in models], **extra}
    r = {
        "legacy mode": cfg(three),
        "source base": cfg(three, tokenizer_source="base"),
        "source union": cfg(three, tokenizer_source="union"),
        "source model": cfg(three, tokenizer_source=m["tok_chatml"]),
        "slerp union": {**cfg([m["tok_base"], m["tok_chatml"]], "slerp", tokenizer_source="union"),
                        "parameters": {"t": 0.5}},
        "force token": cfg([m["tok_base"], m["tok_chatml"]], tokenizer={"source": "union", "tokens": {
            "_tok_10": {"source": m["tok_chatml"], "force": True}, "_tok_11": {"source": m["tok_base"], "force": True}}}),
        "model token id": cfg([m["tok_base"], m["tok_chatml"]], tokenizer={"source": "base", "tokens": {
            "_tok_20": {"source": {"kind": "model_token", "model": m["tok_chatml"], "token_id": 64}, "force": True},
            "_tok_21": {"source": {"kind": "model_token", "model": m["tok_base"], "token": "<s>"}, "force": True}}}),
        "pad to multiple of": {**cfg([m["tok_chatml"]], tokenizer={"source": "base", "pad_to_multiple_of": 16}),
                               "base_model": m["tok_chatml"]},
    }
    chat = {"merge_method": "linear", "base_model": m["tok_base"], "dtype": "bfloat16",
            "models": [{"model": m["tok_base"], "parameters": {"weight": 0.5}},
                       {"model": m["chat_b"], "parameters": {"weight": 0.5}}]}
    r["chat template chatml"] = {**chat, "chat_template": "chatml"}
    r["chat template literal"] = {**chat, "chat_template": "{{messages[0]['content']}}"}
    return {f"tokenizer/{k}": v for k, v in r.items()}


# -- running and comparing ---------------------------------------------------------------------------

MK_RUNNER = """
import json, sys, traceback
from mergekit.config import MergeConfiguration
from mergekit.merge import MergeOptions, run_merge
status = {}
for name, (cfg, out) in json.loads(sys.argv[1]).items():
    try:
        run_merge(MergeConfiguration.model_validate(cfg), out, MergeOptions(quiet=True))
        status[name] = None
    except Exception as exc:
        status[name] = (type(exc).__name__ + ': ' + str(exc)).splitlines()[0][:160]
print(json.dumps(status))
"""


def run_mergekit(recipes: dict[str, dict], work: Path) -> tuple[dict[str, str | None], float]:
    jobs = {n: (cfg, str(work / "mk" / n.replace("/", "_").replace(" ", "_"))) for n, cfg in recipes.items()}
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HTTPS_PROXY": "http://127.0.0.1:9",
           "HTTP_PROXY": "http://127.0.0.1:9"}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", MK_RUNNER, json.dumps(jobs)], env=env, capture_output=True,
                          text=True, timeout=3600)
    if proc.returncode != 0:
        raise SystemExit(f"mergekit runner failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1]), time.perf_counter() - start


def run_weightsmith(name: str, cfg: dict, out: Path) -> str | None:
    from weightsmith.errors import WeightsmithError
    from weightsmith.merge import merge, parse_recipe

    cfg = json.loads(json.dumps(cfg))
    cfg["parameters"] = {**(cfg.get("parameters") or {}), "compat": "mergekit"}
    try:
        merge(parse_recipe(yaml.safe_dump(cfg, sort_keys=False), name), out, device="cpu", force=True)
        return None
    except WeightsmithError as exc:
        return str(exc).splitlines()[0][:160]


def compare(ours: Path, theirs: Path, method: str, base: str | None, inputs: list[str]) -> tuple[bool, str]:
    from weightsmith.checkpoint import Checkpoint

    a, b = Checkpoint(ours), Checkpoint(theirs)
    if sorted(a.names()) != sorted(b.names()):
        only_a = sorted(set(a.names()) - set(b.names()))
        only_b = sorted(set(b.names()) - set(a.names()))
        return False, f"tensor names differ (only ours: {only_a[:2]}, only mergekit's: {only_b[:2]})"
    for key in ("vocab_size", "num_hidden_layers", "n_layer"):
        if (a.config or {}).get(key) != (b.config or {}).get(key):
            return False, f"config {key} {a.config.get(key)} vs {b.config.get(key)}"
    note = ""
    if (ours / "tokenizer.json").is_file() != (theirs / "tokenizer.json").is_file():
        if any((Path(p) / "tokenizer.json").is_file() for p in inputs):
            return False, "one output has a tokenizer, the other not"
        note = "; no input has a tokenizer (mergekit writes a 1-token placeholder, weightsmith none)"
    elif (ours / "tokenizer.json").is_file():
        from transformers import AutoTokenizer
        ta, tb = AutoTokenizer.from_pretrained(str(ours)), AutoTokenizer.from_pretrained(str(theirs))
        if ta.get_vocab() != tb.get_vocab():
            return False, "vocabularies differ"
        if bool(ta.chat_template) != bool(tb.chat_template):
            return False, "chat template written by one only"
    if method in RANDOM_METHODS:
        ref = Checkpoint(base)
        kept_a = kept_b = moved_a = moved_b = n = 0
        for name in a.names():
            x, y, z = a.get(name).float(), b.get(name).float(), ref.get(name).float()
            kept_a += (x == z).sum().item()
            kept_b += (y == z).sum().item()
            moved_a += (x - z).abs().sum().item()
            moved_b += (y - z).abs().sum().item()
            n += x.numel()
        ok = abs(kept_a - kept_b) <= 0.05 * max(kept_b, 1) + 0.01 * n and abs(moved_a - moved_b) <= 0.05 * moved_b
        return ok, (f"random: at base {kept_a / n:.3f} vs {kept_b / n:.3f}, mean |change| "
                    f"{moved_a / n:.3g} vs {moved_b / n:.3g}{note}")
    worst, exact = 0.0, True
    for name in a.names():
        x, y = a.get(name), b.get(name)
        if x.dtype != y.dtype:
            same = torch.equal(x, y.to(x.dtype))
            return False, (f"mergekit writes {str(y.dtype)[6:]} for a {str(x.dtype)[6:]} recipe (its result is not cast)"
                           + (f"; equal once rounded to {str(x.dtype)[6:]}" if same else ""))
        if not torch.equal(x, y):
            exact = False
            worst = max(worst, (x.float() - y.float()).abs().max().item())
    if exact:
        return True, "bit-equal" + note
    return worst <= 1e-6, f"max |diff| {worst:.3g}{note}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=None, help="folder for stand-ins and outputs (default: a temp dir)")
    ap.add_argument("--only", default=None, help="run only recipes whose name contains this")
    ap.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers
    transformers.utils.logging.set_verbosity_error()
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        models = build_models(work / "models")
        recipes = {**example_recipes(models), **basic_recipes(models), **tokenizer_recipes(models)}
        if args.only:
            recipes = {k: v for k, v in recipes.items() if args.only in k}
        mk_status, mk_seconds = run_mergekit(recipes, work)
        rows, ws_seconds = [], 0.0
        for name, cfg in recipes.items():
            out = work / "ws" / name.replace("/", "_").replace(" ", "_")
            start = time.perf_counter()
            ws_err = run_weightsmith(name, cfg, out)
            ws_seconds += time.perf_counter() - start
            mk_err = mk_status[name]
            if mk_err and ws_err:
                rows.append((name, "reproduced", f"both refuse (mergekit: {mk_err[:60]})"))
            elif ws_err:
                rows.append((name, "refused", ws_err))
            elif mk_err:
                rows.append((name, "different", f"mergekit fails ({mk_err}); weightsmith merges"))
            else:
                mk_out = work / "mk" / name.replace("/", "_").replace(" ", "_")
                inputs = [x["model"] for x in cfg.get("models", [])] + [
                    src["model"] for sl in cfg.get("slices", []) for src in sl["sources"]]
                ok, detail = compare(out, mk_out, cfg["merge_method"], cfg.get("base_model"), inputs)
                rows.append((name, "reproduced" if ok else "different", detail))
    if args.json:
        print(json.dumps([{"recipe": n, "outcome": o, "detail": d} for n, o, d in rows], indent=1))
        return
    width = max(len(n) for n, _, _ in rows)
    for name, outcome, detail in rows:
        print(f"{name:<{width}}  {outcome:<10}  {detail}")
    counts = {k: sum(1 for _, o, _ in rows if o == k) for k in ("reproduced", "different", "refused")}
    print(f"\n{len(rows)} recipes: {counts['reproduced']} reproduced, {counts['different']} accepted and different, "
          f"{counts['refused']} refused   (mergekit {mk_seconds:.0f} s, weightsmith {ws_seconds:.0f} s; "
          f"{os.cpu_count()}-core x86-64 CPU)")


if __name__ == "__main__":
    main()
