"""The run config of `dimoo train`: YAML sections plus ``key=value`` overrides, checked before anything starts.

Sections (``configs/train/*.yaml`` document every key with a comment):

- ``gpt_args``: parallelism, batch, optimizer and schedule, under the snake_case names of MindSpeed-MM's
  ``gpt_args`` (Megatron's CLI flags), so a MindSpeed-MM user reads them without a glossary.
- ``model``: where the weights come from (``init_from`` a Hugging Face folder, or a fresh ``config``).
- ``data``: the pre-tokenized shards and how batches are formed.
- ``lora``: low-rank adapters (peft) on the blocks' projections instead of a full fine-tune (``rank`` null: off).
- ``rl`` (optional): Self-GRPO instead of supervised fine-tuning (`dimoo_npu.rl`); its presence turns it on.
- top level: ``output_dir`` (metrics.jsonl, checkpoints), ``device``, ``resume`` and the rest of our own keys.

An override names a key as ``section.key=value`` or, when the name is unique, ``key=value``
(``lr=1e-4``, ``train_iters=20``); values are parsed as YAML.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dimoo_npu.utils.errors import ConfigError
from dimoo_npu.utils.validate import MAX_LENGTH_LIMIT, check_int, shown

DECAY_STYLES = ("cosine", "linear", "constant")
RESUME_CHOICES = ("auto", "never")
LIKELIHOOD_ESTIMATES = ("sampled_timestep", "trajectory")  # see dimoo_npu.rl.likelihood
REWARD_MODELS = ("policy", "reference")
ITERS_LIMIT = 2**31 - 1
# Every integer key's [smallest, largest] (None allowed where the field is optional); tp and pp are checked against
# the model and the world by `train.layout.plan_layout`.
INT_BOUNDS: dict[str, tuple[int, int]] = {
    "gpt_args.micro_batch_size": (1, 2**20),
    "gpt_args.global_batch_size": (1, 2**24),
    "gpt_args.train_iters": (1, ITERS_LIMIT),
    "gpt_args.log_interval": (1, ITERS_LIMIT),
    "gpt_args.save_interval": (0, ITERS_LIMIT),
    "gpt_args.lr_warmup_iters": (0, ITERS_LIMIT),
    "gpt_args.lr_decay_iters": (1, ITERS_LIMIT),
    "gpt_args.seed": (0, 2**63 - 1),
    "data.seq_length": (1, MAX_LENGTH_LIMIT),  # the longest cap any sampler takes (dimoo_npu.utils.validate)
    "keep_checkpoints": (0, ITERS_LIMIT),
    # rl: the upper bounds (the lower ones are RLArgs.check's, with their reasons)
    "rl.num_generations": (1, 4096),
    "rl.num_iterations": (1, 4096),
    "rl.width": (1, 16 * MAX_LENGTH_LIMIT),
    "rl.height": (1, 16 * MAX_LENGTH_LIMIT),
    "rl.timesteps": (1, MAX_LENGTH_LIMIT),
    "rl.answer_length": (1, MAX_LENGTH_LIMIT),
    "rl.answer_steps": (1, MAX_LENGTH_LIMIT),
    "rl.task_items": (1, 2**20),
    "rl.eval_interval": (0, ITERS_LIMIT),
    "rl.eval_limit": (1, 2**20),
}


@dataclass
class GptArgs:
    """MindSpeed-MM / Megatron names (``--tensor-model-parallel-size`` -> ``tensor_model_parallel_size``)."""

    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    micro_batch_size: int = 1  # samples per forward of one rank
    global_batch_size: int = 1  # samples per optimizer step, all ranks: micro * microbatches * dp
    sequence_parallel: bool = False
    recompute_granularity: str | None = None  # None/"none", "full" or "selective"
    use_distributed_optimizer: bool = True  # True: FSDP2 (sharded params/grads/states), False: DDP
    lr: float = 1e-5
    min_lr: float = 0.0
    lr_warmup_iters: int = 0
    lr_warmup_fraction: float | None = None  # when set, warmup = fraction * lr_decay_iters
    lr_decay_style: str = "cosine"
    lr_decay_iters: int | None = None  # default: train_iters
    weight_decay: float = 0.0
    clip_grad: float = 1.0  # max global grad norm; 0 disables clipping
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    train_iters: int = 1000
    save_interval: int = 0  # 0: save only at the end
    log_interval: int = 1  # progress-bar postfix every N steps (metrics.jsonl gets every step)
    seed: int = 1234
    bf16: bool = True  # bf16 compute with fp32 master weights and fp32 gradient reduction


@dataclass
class ModelArgs:
    init_from: str | None = None  # Hugging Face folder (config.json + safetensors) to start from
    config: dict[str, Any] | None = None  # LLaDA config.json dict for a fresh random model (tests, tiny runs)
    ops: str | None = None  # op override as DIMOO_OPS takes it, e.g. "reference"
    preset: str | None = None  # built-in sizes (dimoo_npu.modeling.presets) for --check/--plan when init_from is absent

    def overridden(self, name: str) -> None:
        """A weight source set on the command line replaces the file's conflicting ones: the command line wins."""
        if getattr(self, name) is not None:
            for other in _REPLACED_BY.get(name, ()):
                setattr(self, other, None)


# model.init_from and model.config are alternatives; model.preset gives sizes as model.config does.
_REPLACED_BY = {"init_from": ("config",), "config": ("init_from", "preset"), "preset": ("config",)}


@dataclass
class DataArgs:
    shards: str = ""  # folder written by `dimoo pretokenize`
    seq_length: int | None = None  # pad every batch to this length (required with pipeline parallel)
    cond_drop_prob: float = 0.1  # share of samples whose user text becomes <uncondition> (for CFG)
    group_by_length: bool = False  # batches of similar-length samples: less padding when lengths vary widely


# The blocks' attention and MLP projections. Matched as ``blocks.N.<name>`` only: ``ff_out`` also names the output
# head, which the forward reads as a bare weight (an adapter on it would be bypassed).
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "attn_out", "ff_proj", "up_proj", "ff_out")


@dataclass
class LoraArgs:
    """LoRA (peft): the base weights stay frozen, held once in the compute dtype; only adapters are trained."""

    rank: int | None = None  # adapter rank r; null: no LoRA (a full fine-tune)
    alpha: float | None = None  # scale = alpha / rank; null: alpha = rank (scale 1)
    dropout: float = 0.0  # dropout on the adapters' input
    target_modules: list[str] = field(default_factory=lambda: list(LORA_TARGETS))  # block projections to adapt

    @property
    def enabled(self) -> bool:
        return self.rank is not None

    def check(self) -> None:
        if not self.enabled:
            return
        if self.rank < 1:
            raise ConfigError(
                f"lora.rank is {self.rank}; it must be at least 1 (e.g. 16), or null for full fine-tuning"
            )
        if self.alpha is not None and self.alpha <= 0:
            raise ConfigError(f"lora.alpha is {self.alpha}; it must be positive (null: equal to the rank)")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"lora.dropout {self.dropout} is not a probability in [0, 1)")
        if not self.target_modules or not all(isinstance(name, str) for name in self.target_modules):
            raise ConfigError(f"lora.target_modules must list block projections, e.g. {list(LORA_TARGETS)}")


@dataclass
class RLArgs:
    """Self-GRPO (`dimoo_npu.rl`), under TRL's GRPOConfig names where one fits (num_generations, beta, epsilon,
    temperature, num_iterations). ``gpt_args.global_batch_size`` counts completions: prompts * num_generations."""

    num_generations: int = 4  # completions per prompt (the group whose rewards are normalised)
    beta: float = 0.04  # KL coefficient to the frozen reference; 0 drops the reference model
    epsilon: float = 0.2  # clip range of the ratio: [1 - epsilon, 1 + epsilon]
    temperature: float = 1.0  # rollout sampling temperature (greedy rollouts would make every advantage 0)
    greedy_completion: bool = False  # the last completion of each group is the greedy decode (the path evaluation
    # takes; the others are sampled at temperature), scored and updated like the rest
    num_iterations: int = 1  # optimizer updates per rollout batch
    likelihood: str = "sampled_timestep"  # sampled_timestep (d1 / UniGRPO) | trajectory (per-step log-probs)
    skip_uniform_groups: bool = False  # leave groups whose rewards all agree out of the update (their advantage is
    # 0: with beta 0 the same update, only cheaper; with beta > 0 their KL term is dropped, as DAPO drops them)
    prompts: str = "shapes"  # "shapes" (the shapes world) or a JSONL of {prompt, questions: [{question, answer}]}
    attributes: list | None = None  # shapes world: attributes asked about; null: colour, shape, position, size
    reward_function: str | None = None  # module:function (PIL images, prompts -> [0, 1] floats) replaces self-reward
    reward_model: str = "policy"  # who answers the questions: the policy, or the frozen reference copy
    assets: str | None = None  # folder with the tokenizer and vqvae/; null: model.init_from
    width: int | None = None  # image size of the rollouts; null: the assets' generation_defaults, else 512
    height: int | None = None
    timesteps: int | None = None  # image sampling steps; null: generation_defaults, else 64
    cfg_scale: float = 0.0  # text guidance of the rollouts (the likelihood scores the conditional branch)
    answer_length: int | None = None  # answer tokens of the self-reward; null: generation_defaults, else 32
    answer_steps: int | None = None  # answer sampling steps; null: answer_length
    answer_kv_cache: str = "none"  # the self-reward's answers: none (exact) | prefix | dual (`sample_text`'s caches)
    answer_parallel_threshold: float | None = None  # reveal every answer token this confident at once (null: exact)
    understanding: bool = False  # also num_generations sampled answers per prompt about its true picture (shapes)
    tasks: list | None = None  # shapes world: rollout tasks, one per prompt group in turn (repeat one to weight
    # it): t2i, edit-<kind> (recolour, move, turn, resize, add), caption; null: [t2i]
    task_items: int = 512  # training-split items drawn per edit or caption task
    augment: bool = False  # jitter the colours and add noise to the pictures a rollout reads (robust beyond renders)
    eval_interval: int = 0  # steps between in-run scorings of eval_tasks on held-out items (0: none)
    eval_tasks: list | None = None  # `dimoo eval shapes --task` names scored in-run; null: the rollout tasks
    eval_limit: int = 12  # held-out items per in-run task (the full `dimoo eval shapes` runs after training)

    def image_size(self, defaults: dict[str, Any]) -> tuple[int, int]:
        """(width, height) of the rollouts: as set, else the checkpoint's generation_defaults, else 512."""
        return self.width or defaults.get("width", 512), self.height or defaults.get("height", 512)

    def check(self, global_batch_size: int) -> None:
        """Value checks that need no model: before any weight is read or any rollout sampled."""
        if self.num_generations < 2:
            raise ConfigError(
                f"rl.num_generations is {self.num_generations}: GRPO normalises rewards within a group, which "
                "needs at least 2 completions per prompt"
            )
        if global_batch_size % self.num_generations:
            raise ConfigError(
                f"gpt_args.global_batch_size {global_batch_size} counts completions and must be a multiple of "
                f"rl.num_generations {self.num_generations}"
            )
        if self.temperature <= 0:
            raise ConfigError(
                f"rl.temperature is {self.temperature}: greedy rollouts make the {self.num_generations} completions "
                "of a prompt identical and every advantage 0; use a temperature > 0 (1.0 samples the policy)"
            )
        if self.epsilon <= 0 or self.beta < 0 or self.num_iterations < 1:
            raise ConfigError("rl.epsilon must be > 0, rl.beta >= 0 and rl.num_iterations >= 1")
        if self.cfg_scale < 0:
            raise ConfigError(f"rl.cfg_scale is {self.cfg_scale}; it must not be negative")
        check_choice("rl.likelihood", self.likelihood, LIKELIHOOD_ESTIMATES)
        check_choice("rl.reward_model", self.reward_model, REWARD_MODELS)
        if self.task_items < 1 or self.eval_interval < 0 or self.eval_limit < 1:
            raise ConfigError("rl.task_items and rl.eval_limit must be at least 1, rl.eval_interval at least 0")
        for name in ("width", "height", "timesteps", "answer_length", "answer_steps"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"rl.{name} is {value}; it must be at least 1")


@dataclass
class TrainConfig:
    gpt_args: GptArgs = field(default_factory=GptArgs)
    model: ModelArgs = field(default_factory=ModelArgs)
    data: DataArgs = field(default_factory=DataArgs)
    lora: LoraArgs = field(default_factory=LoraArgs)
    output_dir: str = "runs/dimoo"
    device: str = "auto"  # auto, cpu, cuda, npu; each rank takes LOCAL_RANK's device
    resume: str = "auto"  # auto: continue from output_dir's latest checkpoint; never: refuse a folder that has one
    pipeline_schedule: str = "1F1B"
    keep_checkpoints: int = 2  # checkpoints kept in output_dir (the newest ones); 0 keeps all
    peak_tflops: float | None = None  # per-device peak for MFU; None: known accelerators, measured on CPU
    plot: bool = False  # write loss/throughput curves (curves.png) at the end
    rl: RLArgs | None = None  # Self-GRPO instead of supervised fine-tuning; on when the section is present

    @property
    def recompute(self) -> str:
        return self.gpt_args.recompute_granularity or "none"

    def check(self) -> None:
        """Value checks that need no model and no world size; the parallel layout is `train.layout.plan_layout`'s."""
        g = self.gpt_args
        sections = [("gpt_args.", g), ("data.", self.data), ("lora.", self.lora), ("", self)]
        for prefix, section in sections + ([("rl.", self.rl)] if self.rl else []):
            for item in dataclasses.fields(section):
                value = getattr(section, item.name)
                if isinstance(value, float) and not math.isfinite(value):
                    raise ConfigError(f"{prefix}{item.name} is {value}: use a finite number")
                bounds = INT_BOUNDS.get(prefix + item.name)
                if bounds is not None and value is not None:
                    check_int(prefix + item.name, value, *bounds, error=ConfigError)
        check_choice("gpt_args.lr_decay_style", g.lr_decay_style, DECAY_STYLES)
        check_choice("resume", self.resume, RESUME_CHOICES)
        if not 0.0 <= self.data.cond_drop_prob <= 1.0:
            raise ConfigError(f"data.cond_drop_prob {self.data.cond_drop_prob} is not a probability in [0, 1]")
        if g.min_lr > g.lr:
            raise ConfigError(f"gpt_args.min_lr {g.min_lr} is above lr {g.lr}: lower min_lr or raise lr")
        if (self.model.init_from is None) == (self.model.config is None) and self.model.preset is None:
            raise ConfigError(
                "set exactly one of model.init_from (a Hugging Face folder) and model.config "
                "(a config.json dict for a fresh model), or model.preset (built-in sizes, e.g. lumina-dimoo-8b)"
            )
        if self.model.preset is not None and self.model.config is not None:
            raise ConfigError("model.preset and model.config both give the model's sizes: keep one of them")
        if self.rl is not None:
            self.rl.check(g.global_batch_size)
        elif not self.data.shards:
            raise ConfigError("data.shards is empty: point it at the folder `dimoo pretokenize` wrote")
        self.lora.check()

    def warmup_iters(self) -> int:
        g = self.gpt_args
        if g.lr_warmup_fraction is not None:
            return int(g.lr_warmup_fraction * self.decay_iters())
        return g.lr_warmup_iters

    def decay_iters(self) -> int:
        return self.gpt_args.lr_decay_iters or self.gpt_args.train_iters

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{name} is {shown(value)}; choose one of {', '.join(choices)}")


def load_config(path: str | Path | None, overrides: list[str] = ()) -> TrainConfig:
    """Read a YAML run config (or start from defaults when ``path`` is None), then apply overrides."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"run config {path} does not exist: pass a YAML file such as configs/train/tiny_cpu.yaml")
        raw = parse_yaml(path.read_text(), str(path)) or {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{path} must hold a mapping of sections (gpt_args, model, data, ...)")
    config = _build(TrainConfig, raw, "")
    for item in overrides:
        apply_override(config, item)
    config.check()
    return config


def apply_override(config: TrainConfig, item: str) -> None:
    """Apply one ``key=value`` (``section.key=value`` or a unique bare key) to ``config`` in place."""
    key, sep, text = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {shown(item)} is not key=value (e.g. lr=1e-4 or data.seq_length=512)")
    target, name = _locate(config, key.strip())
    value = parse_yaml(text, f"override {shown(key)}") if text.strip() else None
    hint = typing.get_type_hints(type(target))[name]
    setattr(target, name, _coerce(value, hint, key))
    if isinstance(target, ModelArgs):
        target.overridden(name)


def _locate(config: TrainConfig, key: str) -> tuple[Any, str]:
    sections = {
        f.name: getattr(config, f.name)
        for f in dataclasses.fields(config)
        if dataclasses.is_dataclass(getattr(config, f.name))
    }
    if "." in key:
        section, _, name = key.partition(".")
        optional = _section_type(typing.get_type_hints(TrainConfig).get(section))
        if section not in sections and optional is not None and name in _field_names(optional):
            sections[section] = optional()  # an override into an absent optional section (rl) turns it on
            setattr(config, section, sections[section])
        owner = sections.get(section)
        if owner is not None and name in _field_names(owner):
            return owner, name
        raise ConfigError(f"unknown config key {key!r}{_suggest(key, _all_keys(config))}")
    owners = [owner for owner in sections.values() if key in _field_names(owner)]
    if key in _field_names(config) and key not in sections:
        owners.append(config)
    if len(owners) == 1:
        return owners[0], key
    if len(owners) > 1:
        raise ConfigError(f"key {key!r} is in several sections: write it as section.{key}")
    raise ConfigError(f"unknown config key {key!r}{_suggest(key, _all_keys(config))}")


def _field_names(obj: Any) -> set[str]:
    return {f.name for f in dataclasses.fields(obj)}


def _all_keys(config: TrainConfig) -> list[str]:
    keys = []
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            keys += [f"{f.name}.{name}" for name in sorted(_field_names(value))] + sorted(_field_names(value))
        else:
            keys.append(f.name)
    return keys


def _suggest(key: str, keys: list[str]) -> str:
    close = difflib.get_close_matches(key, keys, n=1)
    return f"; did you mean {close[0]!r}?" if close else "; see configs/train/tiny_cpu.yaml for every key"


def _build(cls: type, raw: dict[str, Any], prefix: str) -> Any:
    """A dataclass from a YAML mapping: unknown keys and wrong types are errors that name the key."""
    if not isinstance(raw, dict):
        raise ConfigError(f"section {prefix.rstrip('.')!r} must be a mapping of key: value")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        full = [f"{prefix}{name}" for name in sorted(names)]
        raise ConfigError(f"unknown config key {prefix}{unknown[0]!r}{_suggest(prefix + unknown[0], full)}")
    values = {}
    for name, value in raw.items():
        hint = hints[name]
        section = _section_type(hint)
        if section is not None:  # a section; an optional one (rl) is on when present, even empty
            values[name] = _build(section, value or {}, f"{prefix}{name}.")
        else:
            values[name] = _coerce(value, hint, prefix + name)
    return cls(**values)


def _section_type(hint: Any) -> type | None:
    """The dataclass of a section's type hint (``GptArgs``, or ``RLArgs | None``), else None."""
    for kind in typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,):
        if dataclasses.is_dataclass(kind):
            return kind
    return None


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Check ``value`` against a field's type; YAML's ``1e-4`` (a string in YAML 1.1) becomes a float."""
    allowed = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    if value is None:
        if type(None) in allowed:
            return None
        raise ConfigError(f"config key {key} may not be null")
    for kind in allowed:
        kind = typing.get_origin(kind) or kind
        if kind is bool and isinstance(value, bool):
            return value
        if kind is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if kind is float and isinstance(value, (int, float, str)) and not isinstance(value, bool):
            try:
                return float(value)
            except ValueError:
                continue
        if kind in (str, dict, list) and isinstance(value, kind):
            return value
    names = " or ".join(getattr(k, "__name__", str(k)) for k in allowed)
    raise ConfigError(f"config key {key} is {shown(value)}; it must be {names}")


def parse_yaml(text: str, where: str) -> Any:
    """YAML as `yaml.safe_load` reads it, for files and ``key=value`` overrides alike, with two refusals: a key
    given twice in one mapping (YAML keeps the last silently: a whole section could vanish) and aliases
    (``*name``: a few lines of them make a value of billions of items). Any problem is a ConfigError naming
    ``where`` and the line, its text bounded."""
    import yaml

    class Loader(yaml.SafeLoader):
        def compose_node(self, parent, index):
            if self.check_event(yaml.AliasEvent):
                mark = self.peek_event().start_mark
                raise ConfigError(
                    f"{where}, line {mark.line + 1}: YAML aliases (*name) are not accepted in a run config: "
                    "write the value out"
                )
            return super().compose_node(parent, index)

        def construct_mapping(self, node, deep=False):
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=deep)
                line = key_node.start_mark.line + 1
                try:
                    first = seen.setdefault(key, line)
                except TypeError:
                    continue  # an unhashable key: SafeLoader's own error names it
                if first != line:
                    raise ConfigError(
                        f"{where}, line {line}: key {shown(key)} is given twice (first on line {first}); "
                        "YAML would keep only the last: merge them into one"
                    )
            return super().construct_mapping(node, deep)

    try:
        return yaml.load(text, Loader=Loader)  # noqa: S506 (a SafeLoader subclass)
    except ConfigError:
        raise
    except (yaml.YAMLError, ValueError, RecursionError) as err:  # ValueError: an integer of over 4300 digits
        detail = " ".join(str(err)[:2000].split())[:300]  # the problem and its line, never the whole value
        raise ConfigError(f"{where} is not valid YAML: {detail}") from None
