"""The output tokenizer of a merge and the vocabulary rows that go with it, as mergekit builds them:
``tokenizer_source`` (base / union / a model folder), the ``tokenizer:`` block (``source``, ``tokens``
with ``force`` and ``model_token`` / ``zero`` sources, ``pad_to_multiple_of``) and ``chat_template``
(a template name or a literal Jinja template).

Each input's embedding / head rows are first re-indexed to the output vocabulary (``permute_rows``);
the merge method then sees tensors of one shape. A token only one input knows takes that input's
row; one that several know but the base lacks takes their mean; ``force`` replaces a token's row in
every input by its configured source; rows added by ``pad_to_multiple_of`` are the mean of the rest.
"""
from __future__ import annotations

import json
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import re

import torch

from ..errors import WeightsmithError
from .recipe import _model_ref, refuse_unknown

# Tensors whose rows are the vocabulary (cropped to the common rows, or re-indexed to the output tokenizer).
VOCAB_NAMES = re.compile(r"(embed_tokens|lm_head|wte|word_embeddings|embed_out|output)\.weight$")

TOKENIZER_KEYS = {"source", "tokens", "pad_to_multiple_of"}
TOKEN_KEYS = {"source", "force"}
MODEL_TOKEN_KEYS = {"kind", "model", "token_id", "token"}
# Chat templates by name (written here; each renders messages the way its family expects).
# Chat templates by name, each rendering (under transformers' Jinja settings: trim_blocks, lstrip_blocks) exactly
# the prompts mergekit 0.1.5's template of that name renders, whitespace included (tests/merge/test_tokenizer.py
# renders conversations through both).
CHAT_TEMPLATES = {
    "chatml": ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] "
               "+ '<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
               "{% endif %}"),
    "llama3": ("{% for message in messages %}{% if loop.first %}{{ bos_token }}{% endif %}{{ '<|start_header_id|>' "
               "+ message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>\\n' }}"
               "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
               "{% endif %}"),
    "alpaca": ("{% set system = messages | selectattr('role', 'equalto', 'system') | list %}"
               "{{ (system | last)['content'] | trim if system else '' }}{{ '\\n\\n' }}"
               "{% set heads = {'user': '### Instruction:\\n', 'assistant': '### Response:\\n', "
               "'user_context': '### Input:\\n'} %}{% for message in messages %}{% if message['role'] in heads %}"
               "{{ heads[message['role']] + message['content'] | trim }}{% if not loop.last %}{{ '\\n\\n' }}{% endif %}"
               "{% endif %}{% endfor %}{% if add_generation_prompt and messages[-1]['role'] != 'assistant' %}"
               "{{ '### Response:\\n' }}{% endif %}"),
    "mistral": ("{% set system = messages[0]['content'] if messages[0]['role'] == 'system' else none %}"
                "{{ bos_token }}{% for message in (messages[1:] if system is not none else messages) %}"
                "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('after an optional "
                "system message, the roles must alternate user, assistant, user, ...') }}{% endif %}"
                "{% if message['role'] == 'user' %}{{ ' [INST] ' + (system + '\\n\\n' if loop.first and system is not "
                "none else '') + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
                "{{ ' ' + message['content'] + eos_token }}{% else %}{{ raise_exception('only user and assistant "
                "roles, after an optional system message') }}{% endif %}{% endfor %}"),
    "exaone": ("{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
               "{{ '        [|system|][|endofturn|]\\n\\n' }}{% endif %}{{ '    [|' + message['role'] + '|]' + "
               "message['content'] + '\\n        ' + ('\\n' if message['role'] == 'user' else '[|endofturn|]\\n') + "
               "'\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '    [|assistant|]\\n' }}{% endif %}"),
}


@dataclass
class TokenSource:
    """Where a token's row comes from: a model's row for the same token (``model``), a model's row for
    another token or id (``model`` + ``token``/``token_id``), or zeros (``zero``)."""
    model: str | None = None
    token: str | None = None
    token_id: int | None = None
    zero: bool = False
    force: bool = False


@dataclass
class TokenizerSpec:
    source: str | None  # 'base', 'union', a model folder; None: the reference's tokenizer unchanged
    tokens: dict[str, TokenSource] = field(default_factory=dict)
    pad_to_multiple_of: int | None = None
    chat_template: str | None = None


def parse_tokenizer_options(options: dict, source: str, model_ref) -> TokenizerSpec | None:
    """The recipe's ``tokenizer_source`` / ``tokenizer`` / ``chat_template`` as one spec (None when the
    recipe has none of them: the base's tokenizer files are copied as they are)."""
    chat = options.get("chat_template")
    if chat is not None and (not isinstance(chat, str) or not chat):
        raise WeightsmithError(f"{source}: 'chat_template' must be a template name ({', '.join(sorted(CHAT_TEMPLATES))}, "
                               "auto) or a Jinja template")
    if "tokenizer_source" in options and "tokenizer" in options:
        raise WeightsmithError(f"{source}: give 'tokenizer_source' or a 'tokenizer:' block, not both")
    if options.get("tokenizer") is not None:
        block = options["tokenizer"]
        where = f"{source}: tokenizer"
        if not isinstance(block, dict):
            raise WeightsmithError(f"{where}: expected a mapping with source, tokens, pad_to_multiple_of")
        refuse_unknown(block, TOKENIZER_KEYS, where)
        spec = TokenizerSpec(_source(block.get("source", "union"), f"{where}: source", model_ref))
        pad = block.get("pad_to_multiple_of")
        if pad is not None and (not isinstance(pad, int) or isinstance(pad, bool) or pad < 1):
            raise WeightsmithError(f"{where}: pad_to_multiple_of must be a positive whole number, got {pad!r}")
        spec.pad_to_multiple_of = pad
        tokens = block.get("tokens") or {}
        if not isinstance(tokens, dict):
            raise WeightsmithError(f"{where}: tokens must map a token to {{source: ..., force: ...}}")
        for tok, cfg in tokens.items():
            spec.tokens[str(tok)] = _token_source(cfg, f"{where}: tokens[{tok!r}]", model_ref)
    elif options.get("tokenizer_source") is not None:
        spec = TokenizerSpec(_source(options["tokenizer_source"], f"{source}: tokenizer_source", model_ref))
    elif chat is not None:
        spec = TokenizerSpec(None)  # the reference's tokenizer as it is, with the template
    else:
        return None
    spec.chat_template = chat
    return spec


def _source(value, where: str, model_ref) -> str:
    if value in ("base", "union"):
        return value
    return model_ref(value, where)


def _token_source(cfg, where: str, model_ref) -> TokenSource:
    if not isinstance(cfg, dict):
        raise WeightsmithError(f"{where}: expected {{source: MODEL or {{kind: model_token, ...}}, force: BOOL}}")
    refuse_unknown(cfg, TOKEN_KEYS, where)
    force = cfg.get("force", False)
    if not isinstance(force, bool):
        raise WeightsmithError(f"{where}: force must be true or false, got {force!r}")
    src = cfg.get("source")
    if isinstance(src, dict) and src.get("kind") == "zero":
        refuse_unknown(src, {"kind"}, f"{where}: source")
        return TokenSource(zero=True, force=force)
    if isinstance(src, dict) and "kind" in src:
        at = f"{where}: source"
        refuse_unknown(src, MODEL_TOKEN_KEYS, at)
        if src["kind"] != "model_token":
            raise WeightsmithError(f"{at}: kind must be model_token or zero, got {src['kind']!r}")
        if ("token" in src) == ("token_id" in src):
            raise WeightsmithError(f"{at}: give exactly one of token or token_id")
        tid = src.get("token_id")
        if tid is not None and (not isinstance(tid, int) or isinstance(tid, bool) or tid < 0):
            raise WeightsmithError(f"{at}: token_id must be a whole number >= 0, got {tid!r}")
        return TokenSource(model_ref(src.get("model"), at), src.get("token"), tid, force=force)
    if src is None:
        return TokenSource(force=force)
    return TokenSource(model_ref(src, f"{where}: source"), force=force)


# -- building the vocabulary -------------------------------------------------------------------

def _vocab_size(path: str) -> int | None:
    cfg = Path(path) / "config.json"
    if cfg.is_file():
        value = json.loads(cfg.read_text()).get("vocab_size")
        return value if isinstance(value, int) else None
    return None


def load_tokenizer(path: str):
    from ..checkpoint.tokenizer_files import load_tokenizer as open_tokenizer

    return open_tokenizer(path, use_fast=True)


def stripped_tokenizer(path: str):
    """The tokenizer of ``path`` without the tokens whose id is past the model's ``vocab_size`` (a
    tokenizer may list more tokens than the embedding has rows)."""
    tok = load_tokenizer(path)
    size = _vocab_size(path) or len(tok.get_vocab())
    unused = {t for t, i in tok.get_vocab().items() if i >= size}
    if not unused:
        return tok
    data = json.loads(tok._tokenizer.to_str())
    if data["model"]["type"] != "BPE":
        raise WeightsmithError(f"{path}: the tokenizer lists tokens past vocab_size {size} and is not BPE; only BPE "
                               "vocabularies can be cut")
    import tokenizers

    data["added_tokens"] = [e for e in data["added_tokens"] if e["id"] < size]
    for t in unused:
        data["model"]["vocab"].pop(t, None)

    def keep(merge) -> bool:
        parts = merge.split(" ") if isinstance(merge, str) else merge
        return not any(p in unused for p in parts)

    data["model"]["merges"] = [m for m in data["model"]["merges"] if keep(m)]
    tok._tokenizer = tokenizers.Tokenizer.from_str(json.dumps(data))
    return tok


@dataclass
class Vocabulary:
    """The output tokenizer and, per input folder, the row of each output token (-1: unknown there)."""
    tokenizer: object
    rows: dict[str, list[int]]
    vocabs: dict[str, dict[str, int]]  # each input's own token -> id
    assumed: list[str] = field(default_factory=list)  # inputs without a tokenizer, taken to share the base's

    @property
    def size(self) -> int:
        return len(self.tokenizer.get_vocab())


def union_tokenizer(base_tok, toks: dict[str, object]):
    """The base tokenizer extended by every token another input uses (within its vocab_size), plain
    tokens first, then added tokens with their first-seen settings."""
    plain: dict[str, None] = {}
    added: dict[str, object] = {}
    for path, tok in toks.items():
        size = _vocab_size(path) or tok.vocab_size
        decoder = tok.added_tokens_decoder
        added_names = {info.content for info in decoder.values()}
        for t, i in tok.get_vocab().items():
            if i < size and t not in added_names:
                plain.setdefault(t)
        for i, info in decoder.items():
            if i < size:
                added.setdefault(info.content, info)
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        base_tok.save_pretrained(tmp)
        out = AutoTokenizer.from_pretrained(tmp, use_fast=True)
    known = base_tok.get_vocab()
    for t in plain:
        if t not in added and t not in known:
            out.add_tokens(t)
    for info in added.values():
        out.add_tokens(info)
    return out


def build_vocabulary(spec: TokenizerSpec, base: str, models: list[str]) -> Vocabulary:
    """The output tokenizer for ``spec`` (``base``: the recipe's base model, else its first model) and
    each input's row for every output token. Reads tokenizer files only."""
    base_tok = stripped_tokenizer(base)
    toks = {base: base_tok}
    assumed = []
    for m in models:
        if m not in toks:
            try:
                toks[m] = load_tokenizer(m)
            except WeightsmithError:  # as mergekit: an input without tokenizer files shares the base's
                toks[m] = base_tok
                assumed.append(m)
    if spec.source == "base":
        out = base_tok
    elif spec.source == "union":
        out = union_tokenizer(base_tok, toks)
    else:
        out = load_tokenizer(spec.source)
    have = set(out.get_vocab())
    for t in spec.tokens:
        if t not in have:
            out.add_tokens(t)
            have.add(t)
    vocab = out.get_vocab()
    rows = {}
    for m in [base, *models]:
        own = toks[m].get_vocab()
        size = _vocab_size(m) or len(own)
        perm = [-1] * len(vocab)
        for t, i in vocab.items():
            j = own.get(t, -1)
            perm[i] = j if 0 <= j < size else -1
        rows[m] = perm
    return Vocabulary(out, rows, {m: t.get_vocab() for m, t in toks.items()}, assumed)


def padded_size(n: int, multiple: int | None) -> int:
    return n if not multiple or n % multiple == 0 else (n // multiple + 1) * multiple


def check_token_sources(spec: TokenizerSpec, vocab: Vocabulary, models: list[str], where: str) -> None:
    """Every configured token source names an input and a token it has (before any tensor is read)."""
    for t, src in spec.tokens.items():
        if src.model is None:
            continue
        if src.model not in vocab.rows or src.model not in models:
            raise WeightsmithError(f"{where}: tokens[{t!r}]: source {src.model} is not one of the merged models")
        if src.token is not None and src.token not in vocab.vocabs[src.model]:
            raise WeightsmithError(f"{where}: tokens[{t!r}]: token {src.token!r} is not in {src.model}'s tokenizer")
        if src.token is None and src.token_id is None and vocab.rows[src.model][vocab.tokenizer.get_vocab()[t]] < 0:
            raise WeightsmithError(f"{where}: tokens[{t!r}]: {src.model} has no row for this token")


def permute_rows(tensors: list[torch.Tensor], models: list[str], vocab: Vocabulary, spec: TokenizerSpec,
                 base: str | None) -> list[torch.Tensor]:
    """Each input's vocabulary rows (axis 0) re-indexed to the output vocabulary, in the inputs' order."""
    out_vocab = vocab.tokenizer.get_vocab()
    n = padded_size(len(out_vocab), spec.pad_to_multiple_of)
    dtype = tensors[0].dtype
    for x in tensors[1:]:
        dtype = torch.promote_types(dtype, x.dtype)
    width = tensors[0].shape[1:]
    perms = [vocab.rows[m] for m in models]
    configured = dict(spec.tokens)
    averaged = set()
    for t, i in out_vocab.items():
        if t in configured:
            continue
        holders = [m for m, p in zip(models, perms) if p[i] >= 0]
        if len(holders) == 1:
            configured[t] = TokenSource(holders[0])
        elif not holders:
            configured[t] = TokenSource(zero=True)
        elif base in models and vocab.rows[base][i] >= 0:
            configured[t] = TokenSource(base)
        else:
            averaged.add(t)
    fill = {}
    for t, i in out_vocab.items():
        cfg = configured.get(t)
        if not (cfg is not None and cfg.force) and all(p[i] >= 0 for p in perms):
            continue
        if t in averaged:
            acc = torch.zeros(width, dtype=dtype, device=tensors[0].device)
            count = 0
            for x, p in zip(tensors, perms):
                if p[i] >= 0:
                    acc = acc + x[p[i]]
                    count += 1
            fill[t] = acc / count
        elif cfg is not None:
            fill[t] = _configured_row(cfg, t, i, tensors, models, vocab, dtype)
    forced = [out_vocab[t] for t, src in spec.tokens.items() if src.force and t in out_vocab]
    result = []
    for x, p in zip(tensors, perms):
        rows = torch.zeros((n, *width), dtype=dtype, device=x.device)
        src = torch.tensor(p, dtype=torch.long, device=x.device)
        src[forced] = -1
        have = (src >= 0).nonzero().squeeze(1)
        rows[have] = x[src[have]].to(dtype)
        for t, row in fill.items():
            if src[out_vocab[t]] < 0:
                rows[out_vocab[t]] = row
        if n > len(out_vocab):
            rows[len(out_vocab):] = rows[:len(out_vocab)].mean(dim=0)
        result.append(rows)
    return result


def _configured_row(cfg: TokenSource, token: str, i: int, tensors, models, vocab: Vocabulary, dtype):
    if cfg.zero or cfg.model is None:
        return torch.zeros(tensors[0].shape[1:], dtype=dtype, device=tensors[0].device)
    x = tensors[models.index(cfg.model)]
    if cfg.token_id is not None or cfg.token is not None:
        j = cfg.token_id if cfg.token_id is not None else vocab.vocabs[cfg.model][cfg.token]
        if not 0 <= j < x.shape[0]:
            raise WeightsmithError(f"tokens[{token!r}]: token id {j} is outside {cfg.model}'s {x.shape[0]} rows")
        return x[j]
    return x[vocab.rows[cfg.model][i]]


# -- chat template -----------------------------------------------------------------------------

def chat_template_text(value: str, models: list[str]) -> str | None:
    """The Jinja text for ``chat_template``: a name from CHAT_TEMPLATES, 'auto' (the template most of
    the inputs carry; None when none has one), or a literal template."""
    if value == "auto":
        found = []
        for m in models:
            try:
                tpl = load_tokenizer(m).chat_template
            except WeightsmithError:
                continue
            if isinstance(tpl, dict):
                tpl = tpl.get("default")
            if tpl:
                found.append(tpl.strip())
        return Counter(found).most_common(1)[0][0] if found else None
    if value in CHAT_TEMPLATES:
        return CHAT_TEMPLATES[value]
    if "{" not in value or len(value) < 20:
        raise WeightsmithError(f"chat_template {value!r}: not a known template name ({', '.join(sorted(CHAT_TEMPLATES))}, "
                               "auto) nor a Jinja template")
    return value


def write_tokenizer(vocab_tok, folder: Path, chat_template: str | None) -> None:
    if chat_template is not None:
        vocab_tok.chat_template = chat_template
    vocab_tok.save_pretrained(str(folder))


# -- the engine's side -------------------------------------------------------------------------

@dataclass
class OutputVocabulary:
    """What the merge writes for the tokenizer: ``tokenizer`` (with the chat template set) and the
    vocabulary rows of the output (None: unchanged)."""
    tokenizer: object
    rows_out: int | None
    chat_template: str | None

    def write(self, folder: Path) -> None:
        write_tokenizer(self.tokenizer, folder, self.chat_template)


def _key(path) -> str:
    return str(Path(path).resolve())


def attach_vocabulary(plan):
    """Apply the recipe's tokenizer options to a MergePlan: each vocabulary tensor's inputs are
    re-indexed to the output tokenizer before the method sees them (``job.prepare``), and the plan
    carries what to write. Reads tokenizer files only; a plan without such options is returned as is."""
    recipe = plan.recipe
    spec = parse_tokenizer_options(recipe.options, "recipe", _model_ref)
    if spec is None:
        return plan
    inputs = [_key(p) for p in recipe.inputs]
    if spec.source is None:
        tok = load_tokenizer(str(plan.reference.path))
        template = chat_template_text(spec.chat_template, inputs) if spec.chat_template else None
        plan.vocabulary = OutputVocabulary(tok, None, template)
        return plan
    if spec.source not in ("base", "union"):
        spec.source = _key(spec.source)
    for src in spec.tokens.values():
        src.model = _key(src.model) if src.model else None
    base = _key(recipe.base_model) if recipe.base_model else inputs[0]
    vocab = build_vocabulary(spec, base, inputs)
    check_token_sources(spec, vocab, inputs, "recipe: tokenizer")
    rows = padded_size(vocab.size, spec.pad_to_multiple_of)
    for job in plan.jobs:
        if not (job.float_math and VOCAB_NAMES.search(job.name)):
            continue
        models = [_key(c.path) for c, _ in job.inputs]
        job.rows, job.shape = None, (rows, *job.shape[1:])
        job.prepare = (lambda xs, ms=models: permute_rows(xs, ms, vocab, spec, base))
    template = chat_template_text(spec.chat_template, inputs) if spec.chat_template else None
    plan.vocabulary = OutputVocabulary(vocab.tokenizer, rows, template)
    plan.notes += [f"{m} has no tokenizer: taken to share the base's vocabulary (as mergekit)" for m in vocab.assumed]
    plan.notes.append(f"output vocabulary {vocab.size} tokens ({spec.source if spec.source in ('base', 'union') else 'from ' + spec.source})"
                      + (f", {rows} rows" if rows != vocab.size else ""))
    return plan
