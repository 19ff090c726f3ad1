"""mergekit-moe's YAML as it is (base_model, experts, gate_mode, experts_per_token, shared_experts, dtype,
architecture), parsed and checked before any tensor is read, with the refusals mergekit-moe 0.1.5 makes."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..errors import WeightsmithError
from .recipe import _ref_text, refuse_unknown, yaml_mapping

KNOWN_KEYS = {"base_model", "experts", "gate_mode", "dtype", "experts_per_token", "shared_experts", "architecture"}
EXPERT_KEYS = {"source_model", "positive_prompts", "negative_prompts", "noise_scale", "residual_scale"}
# hidden takes the prompts' last token, as mergekit 0.1.5 does; hidden_avg averages over the tokens
GATE_MODES = ("hidden", "cheap_embed", "random", "uniform_random", "hidden_avg", "hidden_last")
RANDOM_MODES = ("random", "uniform_random")
ARCHITECTURES = {"mixtral": "Mixtral", "qwen": "Qwen MoE"}
REFUSED_ARCHITECTURES = ("DeepSeek MoE", "Qwen3 MoE")


@dataclass
class Expert:
    source_model: str
    positive_prompts: list[str] = field(default_factory=list)
    negative_prompts: list[str] = field(default_factory=list)
    noise_scale: float | None = None
    residual_scale: float | None = None


@dataclass
class MoeConfig:
    base_model: str
    experts: list[Expert]
    gate_mode: str = "hidden"
    dtype: str | None = None
    experts_per_token: int = 2
    shared_experts: list[Expert] = field(default_factory=list)
    architecture: str | None = None
    text: str = ""

    def models(self) -> list[str]:
        return [self.base_model] + [e.source_model for e in self.experts + self.shared_experts]


def _prompts(value, where: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(p, str) for p in value):
        raise WeightsmithError(f"{where}: expected a list of prompt strings, got {value!r}")
    return list(value)


def _number(value, where: str) -> float | None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise WeightsmithError(f"{where}: expected a number, got {value!r}")
    return value


def _ref(value, where: str, root: Path | None) -> str:
    """A model reference as written (a folder, ``org/name[@rev]`` or ``model+adapter``): relative folders that
    exist beside the config are taken from there; nothing is fetched here."""
    from ..checkpoint.sources import rooted

    return rooted(_ref_text(value, where), root)


def _expert(entry, where: str, root: Path | None) -> Expert:
    if not isinstance(entry, dict) or "source_model" not in entry:
        raise WeightsmithError(f"{where}: each expert needs 'source_model: PATH'")
    refuse_unknown(entry, EXPERT_KEYS, where)
    return Expert(_ref(entry["source_model"], f"{where}.source_model", root),
                  _prompts(entry.get("positive_prompts"), f"{where}.positive_prompts"),
                  _prompts(entry.get("negative_prompts"), f"{where}.negative_prompts"),
                  _number(entry.get("noise_scale"), f"{where}.noise_scale"),
                  _number(entry.get("residual_scale"), f"{where}.residual_scale"))


def _experts(data: dict, key: str, source: str, required: bool, root: Path | None) -> list[Expert]:
    raw = data.get(key)
    if raw is None and not required:
        return []
    if not isinstance(raw, list) or (required and not raw):
        raise WeightsmithError(f"{source}: '{key}' must be a{' non-empty' if required else ''} list of "
                               "{source_model: PATH, positive_prompts: [...]}")
    return [_expert(e, f"{source}: {key}[{i}]", root) for i, e in enumerate(raw)]


def _choice(data: dict, key: str, choices, default, source: str):
    value = data.get(key, default)
    if value is not None and value not in choices:
        raise WeightsmithError(f"{source}: '{key}' is {value!r}; choose one of {', '.join(map(str, choices))}")
    return value


def parse_moe_config(text: str, source: str = "config", root: Path | None = None) -> MoeConfig:
    """A checked MoeConfig from mergekit-moe YAML text (nothing opened or fetched; ``root``: the config's folder)."""
    data = yaml_mapping(text, source, "base_model and experts")
    refuse_unknown(data, KNOWN_KEYS, source)
    if "base_model" not in data:
        raise WeightsmithError(f"{source}: 'base_model' is missing")
    ept = data.get("experts_per_token", 2)
    if isinstance(ept, bool) or not isinstance(ept, int):
        raise WeightsmithError(f"{source}: 'experts_per_token' must be a whole number, not {ept!r}")
    dtype = _choice(data, "dtype", ("float32", "bfloat16", "float16", "fp32", "bf16", "fp16"), None, source)
    arch = data.get("architecture")
    if arch is not None and not isinstance(arch, str):
        raise WeightsmithError(f"{source}: 'architecture' must be a name such as mixtral or qwen, not {arch!r}")
    return MoeConfig(_ref(data["base_model"], f"{source}: base_model", root),
                     _experts(data, "experts", source, True, root),
                     _choice(data, "gate_mode", GATE_MODES, "hidden", source), dtype, ept,
                     _experts(data, "shared_experts", source, False, root), arch, text)


def check_moe_config(cfg: MoeConfig, source: str, allow_all_same: bool) -> None:
    """mergekit-moe's refusals: too few experts, missing or identical prompts, all experts one model."""
    if cfg.experts_per_token < 1:
        raise WeightsmithError(f"{source}: 'experts_per_token' must be at least 1")
    if len(cfg.experts) < cfg.experts_per_token:
        raise WeightsmithError(f"{source}: {len(cfg.experts)} experts but experts_per_token is "
                               f"{cfg.experts_per_token}; give at least as many experts")
    if cfg.gate_mode == "random":  # mergekit checks nothing further for random gates
        return
    for i, e in enumerate(cfg.experts):
        if not e.positive_prompts:
            raise WeightsmithError(f"{source}: experts[{i}] has no positive_prompts; gate_mode {cfg.gate_mode} "
                                   "needs them")
    first = (cfg.experts[0].positive_prompts, cfg.experts[0].negative_prompts)
    if all((e.positive_prompts, e.negative_prompts) == first for e in cfg.experts[1:]):
        raise WeightsmithError(f"{source}: every expert has the same prompts, so the router cannot tell them "
                               "apart; give each expert prompts for what it should receive")
    if not allow_all_same and all(e.source_model == cfg.experts[0].source_model for e in cfg.experts[1:]):
        from ..errors import needs_option

        raise needs_option(f"{source}: every expert is the same model, which only costs memory until the MoE is "
                           "trained", "; set {0} to build it for training", "allow_all_same")


def output_architecture(cfg: MoeConfig, model_types: list[str], source: str) -> str:
    """'Mixtral' or 'Qwen MoE', chosen as mergekit-moe chooses (the config's architecture by prefix, Mixtral
    first), or an error saying why neither fits."""
    names = list(ARCHITECTURES.values()) + list(REFUSED_ARCHITECTURES)
    if cfg.architecture:
        names = [n for n in names if n.lower().startswith(cfg.architecture.lower())]
        if not names:
            raise WeightsmithError(f"{source}: architecture {cfg.architecture!r} matches none of "
                                   f"{', '.join(ARCHITECTURES)}")
    if not any(n in ARCHITECTURES.values() for n in names):
        raise WeightsmithError(f"{source}: architecture {names[0]!r} is not supported; use mixtral or qwen")
    reasons = []
    for name in (n for n in names if n in ARCHITECTURES.values()):
        why = _unsupported(name, cfg, model_types)
        if why is None:
            return name
        reasons.append(f"{name}: {why}")
    raise WeightsmithError(f"{source}: no output architecture fits ({'; '.join(reasons)})")


def _unsupported(name: str, cfg: MoeConfig, model_types: list[str]) -> str | None:
    if len(set(model_types)) != 1:
        return f"the models mix architectures ({', '.join(sorted(set(model_types)))})"
    if name == "Mixtral":
        if cfg.shared_experts:
            return "no shared experts"
        return None if model_types[0] in ("llama", "mistral") else f"needs Llama or Mistral models, not {model_types[0]}"
    if len(cfg.shared_experts) != 1:
        return "needs exactly one shared expert"
    if cfg.gate_mode != "random" and not cfg.shared_experts[0].positive_prompts:
        return f"the shared expert needs positive_prompts with gate_mode {cfg.gate_mode}"
    ok = model_types[0] in ("llama", "mistral", "qwen2")
    return None if ok else f"needs Qwen2, Llama or Mistral models, not {model_types[0]}"
