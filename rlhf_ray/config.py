"""Typed run configuration: YAML file + dotted overrides -> frozen dataclass tree.

Every setting has exactly one home here. Loading validates types (OmegaConf structured
configs), unknown keys and value ranges (``__post_init__`` of each section) and raises
:class:`ConfigError` naming the file and the dotted key, so a bad config fails before
any Ray actor starts.
"""
from __future__ import annotations

import dataclasses
import io
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, List, Optional, Sequence

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException


class ConfigError(ValueError):
    """A configuration problem; the message names the source and the dotted key."""


class _FieldError(ValueError):
    """Raised by a section's range checks; ``load_config`` adds file and section."""

    def __init__(self, key: str, message: str):
        super().__init__(message)
        self.key = key


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise _FieldError(key, message)


def _positive(obj: Any, *names: str) -> None:
    for n in names:
        v = getattr(obj, n)
        _check(v > 0, n, f"must be > 0, got {v!r}")


def _nonnegative(obj: Any, *names: str) -> None:
    for n in names:
        v = getattr(obj, n)
        _check(v >= 0, n, f"must be >= 0, got {v!r}")


def _unit_interval(obj: Any, *names: str) -> None:
    for n in names:
        v = getattr(obj, n)
        _check(0.0 <= v <= 1.0, n, f"must be in [0, 1], got {v!r}")


def _did_you_mean(word: Any, choices: Iterable[Any]) -> str:
    """`` (did you mean 'x'?)`` for the closest of ``choices`` to a misspelt ``word``, else ''."""
    import difflib

    names = [str(c) for c in choices]
    close = difflib.get_close_matches(str(word), names, n=1, cutoff=0.6) if isinstance(word, str) else []
    return f" (did you mean {close[0]!r}?)" if close else ""


def _one_of(obj: Any, name: str, choices: Sequence[Any], *, nullable: bool = False) -> None:
    v = getattr(obj, name)
    if v in choices or (nullable and v is None):
        return
    allowed = (f"{choices[0]!r} or {choices[1]!r}" if len(choices) == 2 and not nullable
               else "one of " + ", ".join(map(repr, choices)) + (" or null" if nullable else ""))
    raise _FieldError(name, f"must be {allowed}, got {v!r}{_did_you_mean(v, choices)}")


ALLOCATORS = ("auto", "tcmalloc", "system")

# vLLM seeds numpy with its engine seed (< 2**32) and engine i gets seed + i; 2**31 leaves room.
SEED_LIMIT = 2 ** 31


def _seed(obj: Any) -> None:
    _check(0 <= obj.seed < SEED_LIMIT, "seed", f"must be in [0, 2**31), got {obj.seed!r}")


@dataclass(frozen=True)
class ModelConfig:
    """The policy's base model."""

    path: Optional[str] = None  # local directory or hub id; null = build the tiny model
    tiny_dir: str = "runs/_tiny_model"  # where the tiny model is built when path is null
    dtype: str = "float32"  # float32, bfloat16 or float16; float32 on CPU keeps vLLM and HF log-probs in agreement
    tiny_layers: int = 2  # decoder layers of the tiny model
    tiny_hidden: int = 128  # hidden size of the tiny model
    tiny_heads: int = 2  # head dim = hidden / heads; vLLM's CPU attention wants 32..256
    tiny_vocab: int = 512  # vocabulary of the tiny model's tokenizer (trained on tiny_corpus)
    tiny_max_positions: int = 256  # the tiny model's context length, in tokens
    tiny_corpus: str = "reviews"  # the text its tokenizer learns: reviews, math, objective or dialogue (data.task's)
    tiny_arch: str = "llama"  # the tiny model's architecture: llama (decoder-only) or t5 (encoder-decoder, Flan-T5's layout)
    seed: int = 0  # seeds the tiny model's initialisation and the learner's value head

    def __post_init__(self) -> None:
        _positive(self, "tiny_layers", "tiny_hidden", "tiny_heads", "tiny_vocab", "tiny_max_positions")
        _one_of(self, "dtype", ("float32", "bfloat16", "float16"))
        from .data.task import TASKS

        _one_of(self, "tiny_corpus", list(TASKS))
        _one_of(self, "tiny_arch", ("llama", "t5"))
        _check(self.tiny_hidden % self.tiny_heads == 0, "tiny_hidden",
               f"must be divisible by tiny_heads={self.tiny_heads}, got {self.tiny_hidden}")
        _seed(self)


@dataclass(frozen=True)
class LoraConfig:
    """PEFT LoRA adapter trained by the learner and served by the generators."""

    rank: int = 8  # r: the adapter's inner dimension (at most rollout.max_lora_rank)
    alpha: float = 16.0  # LoRA's scale numerator: the update is scaled by alpha / rank
    dropout: float = 0.0  # dropout on the adapter's input while training
    target_modules: List[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])  # the linear layers that get an adapter (Llama names; all-linear adds gate_proj, up_proj, down_proj)

    def __post_init__(self) -> None:
        _check(self.rank >= 1, "rank", f"must be >= 1, got {self.rank!r}")
        _positive(self, "alpha")
        _check(0.0 <= self.dropout < 1.0, "dropout", f"must be in [0, 1), got {self.dropout!r}")
        _check(len(self.target_modules) > 0, "target_modules", "must name at least one module")
        _check(all(m.strip() for m in self.target_modules), "target_modules",
               f"every entry must be a module name, got {self.target_modules!r}")


# The fine-tuning methods of sft.method and rm.method (rlhf_ray/models/methods.py).
METHODS = ("full", "lora", "dora", "ia3", "ssf", "repadapter")


@dataclass(frozen=True)
class PeftConfig:
    """Settings of the methods besides LoRA for sft.method and rm.method (LoRA and DoRA take
    lora.rank, lora.alpha and lora.dropout). SSF scales and shifts a layer's output per channel;
    RepAdapter adds a linear adapter in front of a layer; IA3 rescales activations (PEFT); all
    fold exactly into the saved model."""

    target_modules: Optional[List[str]] = None  # the Linear layers the method wraps (last names); null = lora.target_modules
    repadapter_rank: int = 8  # RepAdapter's inner dimension (its dense down-projection's output)
    repadapter_groups: int = 2  # RepAdapter's up-projection is block-diagonal in this many groups (divides the rank)
    repadapter_scale: float = 1.0  # RepAdapter's output scale s in W (x + s U D x)
    ia3_feedforward: List[str] = field(default_factory=lambda: ["down_proj"])  # IA3 scales these layers' inputs (the other targets' outputs)

    def __post_init__(self) -> None:
        _check(self.target_modules is None or (len(self.target_modules) > 0 and all(
            isinstance(m, str) and m.strip() for m in self.target_modules)), "target_modules",
               f"must name at least one module, or be null, got {self.target_modules!r}")
        _positive(self, "repadapter_rank", "repadapter_groups", "repadapter_scale")
        _check(self.repadapter_rank % self.repadapter_groups == 0, "repadapter_groups",
               f"{self.repadapter_groups} does not divide peft.repadapter_rank={self.repadapter_rank}")


@dataclass(frozen=True)
class DataConfig:
    """Prompts for PPO, and how every loader treats records. None = the generated task."""

    task: str = "reviews"  # the generated task where no file is given: reviews (sentiment), math (GSM8K-shaped), objective (classification questions in four FewCLUE shapes) or dialogue (SAMSum-shaped summaries)
    prompts_path: Optional[str] = None  # JSONL/JSON file, `datasets` dir or hub name: `prompt`, or text + label
    num_prompts: int = 256  # how many prompts to generate (null prompts_path only)
    max_prompts: Optional[int] = None  # read at most this many records of prompts_path (null = all of it)
    max_prompt_tokens: int = 32  # longer prompts are cut or left out (over_long)
    on_bad_record: str = "skip"  # skip (count and report file:line) or error (stop at the first)
    text_field: Optional[str] = None  # classification sets: the text column; null = first of prompt/text/sentence/...
    label_field: str = "label"  # classification sets: the label column (used by keep_labels and the judge)
    keep_labels: Optional[List[str]] = None  # e.g. ["0"] to prompt only with negative reviews
    prompt_words: Optional[int] = None  # keep the first N words of each text as the prompt
    chat_template: str = "auto"  # message lists: auto (the tokenizer's template, if any), none (plain), or a Jinja file
    over_long: str = "truncate"  # prompts/dialogues over a length limit: truncate (oldest tokens) or drop
    dialogue_template: str = "summarize: {dialogue}"  # records with a `dialogue` column (SAMSum, DialogSum): the prompt; `summary` is the response
    seed: int = 0  # seeds the generated task and the prompt order

    def __post_init__(self) -> None:
        _positive(self, "num_prompts", "max_prompt_tokens")
        _cap(self, "max_prompts")
        from .data.task import TASKS

        _one_of(self, "task", list(TASKS))
        _one_of(self, "on_bad_record", ("skip", "error"))
        t = self.chat_template
        _check(t in ("auto", "none") or (t.strip() == t != "" and t.lower() not in ("auto", "none", "null")),
               "chat_template", f"must be 'auto', 'none' or the path of a Jinja template file, got {t!r}")
        _one_of(self, "over_long", ("truncate", "drop"))
        _check("{dialogue}" in self.dialogue_template, "dialogue_template",
               f"must contain {{dialogue}} (where the dialogue goes), got {self.dialogue_template!r}")
        _check(self.prompt_words is None or self.prompt_words > 0, "prompt_words",
               f"must be > 0 or null, got {self.prompt_words!r}")
        _seed(self)


def _cap(obj: Any, name: str) -> None:
    v = getattr(obj, name)
    _check(v is None or v > 0, name, f"must be > 0 or null (no cap), got {v!r}")


def _check_stage_workers(obj: Any) -> None:
    """The Ray Train keys the SFT and reward-model sections share."""
    _positive(obj, "num_workers")
    _nonnegative(obj, "num_cpus_per_worker")
    _check(obj.batch_size >= obj.num_workers, "batch_size",
           f"{obj.batch_size} is smaller than num_workers={obj.num_workers}: every rank needs a row per step")
    _check(obj.micro_batch_size is None or obj.micro_batch_size > 0, "micro_batch_size",
           f"must be > 0 or null, got {obj.micro_batch_size!r}")


@dataclass(frozen=True)
class SFTConfig:
    """Supervised fine-tuning (`rlhf-ray sft`); its output becomes PPO's base and reference."""

    data_path: Optional[str] = None  # JSONL/JSON or `datasets` dir; null = the generated task
    num_examples: int = 2000  # how many records to generate (null data_path only)
    max_examples: Optional[int] = None  # read at most this many records of data_path (null = all of it)
    method: str = "full"  # full | lora | dora | ia3 | ssf | repadapter: what trains (a method is merged into the saved model, and kept unmerged in sft_model/adapter)
    epochs: int = 2  # passes over the training records
    lr: float = 2e-3  # AdamW learning rate
    batch_size: int = 32  # rows per optimizer step over all workers
    max_seq_len: int = 96  # prompt + response tokens per row; longer records are cut (data.over_long)
    eval_fraction: float = 0.05  # share of the records held out for the eval loss
    output_dir: Optional[str] = None  # null = <output.dir>/<output.name>/sft_model
    num_workers: int = 1  # Ray Train workers (data parallel); the stage runs on them, not on the driver
    use_gpu: bool = False  # one GPU per worker
    num_cpus_per_worker: float = 1.0  # Ray's logical CPUs per worker (bookkeeping)
    micro_batch_size: Optional[int] = None  # rows per forward on one worker (null = its whole share)
    gradient_checkpointing: bool = False  # recompute activations in backward (7B on 24 GB cards)
    seed: int = 0  # seeds the split, the order and the initialisation

    def __post_init__(self) -> None:
        _positive(self, "num_examples", "epochs", "lr", "batch_size", "max_seq_len")
        _cap(self, "max_examples")
        _check_stage_workers(self)
        _one_of(self, "method", METHODS)
        _check(0.0 <= self.eval_fraction < 1.0, "eval_fraction", f"must be in [0, 1), got {self.eval_fraction!r}")
        _seed(self)


@dataclass(frozen=True)
class RMConfig:
    """Reward-model training (`rlhf-ray train-rm`) on preference pairs."""

    data_path: Optional[str] = None  # JSONL/JSON or `datasets` dir of chosen/rejected pairs
    eval_path: Optional[str] = None  # held-out pairs; null = eval_fraction of data_path (generated: held-out subjects)
    num_pairs: int = 1000  # how many pairs to generate (null data_path only)
    max_pairs: Optional[int] = None  # read at most this many records of data_path (null = all of it)
    base: str = "sft"  # sft: start from the SFT model (<run_dir>/sft_model); model: from model.path/tiny
    # pairwise: a one-output reward model trained on chosen/rejected pairs (ranking loss with a margin);
    # classifier: a sequence classifier trained on labelled texts (`text`, `label`), scored as one
    # class's logit (reward.label), built locally as a tiny RoBERTa or fine-tuned from classifier_base
    kind: str = "pairwise"
    classifier_base: Optional[str] = None  # classifier: an encoder classifier to fine-tune (dir or hub id); null = a tiny RoBERTa built here
    label_names: Optional[List[str]] = None  # classifier: class names by label id; null = the generated task's, or the file's sorted labels
    method: str = "full"  # full | lora | dora | ia3 | ssf | repadapter: what trains besides the score head (merged on save, and kept unmerged in reward_model/adapter)
    use_margin: bool = True  # subtract each pair's `margin` inside the ranking loss
    epochs: int = 2  # passes over the training pairs
    lr: float = 1e-3  # AdamW learning rate
    batch_size: int = 16  # pairs per optimizer step over all workers
    max_seq_len: int = 128  # prompt + response tokens of each side of a pair
    eval_fraction: float = 0.1  # share of the pairs held out for the eval accuracy (null eval_path)
    output_dir: Optional[str] = None  # null = <output.dir>/<output.name>/reward_model
    num_workers: int = 1  # Ray Train workers (data parallel); the stage runs on them, not on the driver
    use_gpu: bool = False  # one GPU per worker
    num_cpus_per_worker: float = 1.0  # Ray's logical CPUs per worker (bookkeeping)
    micro_batch_size: Optional[int] = None  # rows per forward on one worker (null = its whole share)
    gradient_checkpointing: bool = False  # recompute activations in backward (7B on 24 GB cards)
    seed: int = 0  # seeds the split, the order and the score head

    def __post_init__(self) -> None:
        _positive(self, "num_pairs", "epochs", "lr", "batch_size", "max_seq_len")
        _cap(self, "max_pairs")
        _check_stage_workers(self)
        _one_of(self, "method", METHODS)
        _one_of(self, "base", ("sft", "model"))
        _one_of(self, "kind", ("pairwise", "classifier"))
        _check(self.label_names is None or len(set(self.label_names)) == len(self.label_names) >= 2, "label_names",
               f"must name at least 2 distinct classes, or be null, got {self.label_names!r}")
        _check(0.0 < self.eval_fraction < 1.0, "eval_fraction", f"must be in (0, 1), got {self.eval_fraction!r}")
        _seed(self)


@dataclass(frozen=True)
class EvalConfig:
    """The independent judge, run on held-out prompts before and after PPO."""

    judge: str = "positive_sentiment"  # positive_sentiment (reviews), exact_match (the final number of an `answer` column), label_match (the first word against an `answer` label word; accuracy per `set` column), rouge (ROUGE-1/2/L/Lsum against a `summary` column; the score is ROUGE-L), or none
    prompts_path: Optional[str] = None  # null = generated prompts from the held-out subjects
    num_prompts: int = 128  # how many held-out prompts to generate (null prompts_path only)
    max_prompts: Optional[int] = None  # read at most this many records of prompts_path (null = all of it)
    samples_per_prompt: int = 2  # responses judged per held-out prompt

    def __post_init__(self) -> None:
        _positive(self, "num_prompts", "samples_per_prompt")
        _cap(self, "max_prompts")
        from .data.task import JUDGES

        _one_of(self, "judge", [*JUDGES, "none"])


VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vllm.config.lora.MaxLoRARanks (0.32)


@dataclass(frozen=True)
class RolloutConfig:
    """Generator actors (vLLM engines, or transformers); their count is independent of the learner's workers."""

    # vllm | transformers (generate on the PEFT model, the adapter swapped in place: what serves
    # encoder-decoder models, which vLLM 0.32 does not) | auto (transformers for an encoder-decoder model, else vllm)
    engine: str = "auto"
    batch_rows: int = 64  # transformers engine: sequences generated together in one batch
    num_engines: int = 2  # generator actors (vLLM engines, or transformers models), each serving the current adapter
    samples_per_prompt: int = 1  # vLLM's n: samples of one prompt, generated together on one engine
    max_new_tokens: int = 24  # longest response, in tokens; a response cut here has no EOS (ppo.truncated says what it earns)
    # Sampling. The learner models temperature, top_k and top_p exactly (its log-probs, KL and
    # entropy are of the same truncated, renormalised distribution vLLM samples from).
    temperature: float = 1.0  # softmax temperature of sampling (1.0 = the policy's own distribution)
    top_p: float = 1.0  # nucleus sampling: keep the smallest set of tokens with this much probability (1.0 = off)
    top_k: int = 0  # sample among the k most likely tokens only (0 = off)
    repetition_penalty: float = 1.0  # only 1.0: the learner cannot model a penalty on history
    max_lora_rank: int = 16  # vLLM's default is 16; the policy's lora.rank must fit under it
    max_loras: int = 1  # adapters an engine holds at once (one version at a time is served)
    max_model_len: Optional[int] = None  # null = longest prompt + max_new_tokens (sizes the engine)
    kv_cache_mib: Optional[int] = None  # explicit KV cache; null = 256 MiB on CPU, on GPU what
    #                                     gpu_memory_utilization leaves after weights and activations
    gpu_memory_utilization: Optional[float] = None  # null = 0.9 x the engine's rollout.num_gpus share on GPU; on CPU vLLM reads it as a
    #                                                 fraction of RAM (null = 0.1)
    enforce_eager: Optional[bool] = None  # null = eager on CPU, CUDA graphs on GPU
    # The engine's core and model runner in the generator's own process instead of two child
    # processes (vLLM's default): each child imports torch and vLLM again, which on the CPU
    # backend is most of an engine's start-up (35 s -> 14 s for the tiny model, generation as
    # fast). null = in-process on CPU, vLLM's default on a GPU.
    engine_in_process: Optional[bool] = None
    # The generators' malloc. vLLM's CPU backend asks for tcmalloc preloaded: generation was
    # ~1.3x faster with it on the tiny model. auto = tcmalloc on CPU where the library is
    # installed (apt install libtcmalloc-minimal4), else the system's; tcmalloc = required.
    allocator: str = "auto"
    num_cpus: float = 0.5  # Ray bookkeeping: roles outnumber cores on a laptop
    num_gpus: float = 0.0  # 1 per engine on a GPU cluster
    seed: int = 0  # engine i gets seed + i; every request also carries a seed from (seed, step, prompt)
    # Asynchronous rollouts: the generators make the next max_staleness steps' samples while the
    # learner trains, so a batch is up to this many adapter versions old (older samples are
    # dropped and counted). 0 = the synchronous loop: every sample from the adapter being trained.
    max_staleness: int = 0
    # A shared fleet's name (`rlhf-ray fleet start`): this run's adapters are served by its
    # engines, beside other runs', instead of engines of its own. null = the run's own engines.
    fleet: Optional[str] = None
    fleet_share: float = 1.0  # this run's weight in the fleet's round-robin between runs (2 = twice another's)

    def __post_init__(self) -> None:
        _check(self.num_engines >= 1, "num_engines", f"must be >= 1, got {self.num_engines!r}")
        _check(self.fleet is None or (isinstance(self.fleet, str) and bool(self.fleet)), "fleet",
               f"must be a fleet's name or null, got {self.fleet!r}")
        _positive(self, "fleet_share")
        _one_of(self, "engine", ("auto", "vllm", "transformers"))
        _positive(self, "batch_rows")
        _positive(self, "samples_per_prompt", "max_new_tokens", "temperature", "max_lora_rank", "max_loras")
        # vLLM's own LoRAConfig refuses any other value, but only inside a rollout actor.
        _check(self.max_lora_rank in VLLM_MAX_LORA_RANKS, "max_lora_rank",
               f"must be one of {list(VLLM_MAX_LORA_RANKS)} (the ranks vLLM's engines accept), "
               f"got {self.max_lora_rank!r}")
        _check(0.0 < self.top_p <= 1.0, "top_p", f"must be in (0, 1], got {self.top_p!r}")
        _check(self.top_k >= 0, "top_k", f"must be >= 0 (0 = off), got {self.top_k!r}")
        _check(self.repetition_penalty == 1.0, "repetition_penalty",
               f"must be 1.0, got {self.repetition_penalty!r}: a penalty on tokens already generated makes "
               "vLLM sample from a distribution the learner's log-probs cannot describe, so the PPO ratio and "
               "KL would be wrong")
        _check(self.max_model_len is None or self.max_model_len > 0, "max_model_len",
               f"must be > 0 or null, got {self.max_model_len!r}")
        _check(self.kv_cache_mib is None or self.kv_cache_mib > 0, "kv_cache_mib",
               f"must be > 0 or null, got {self.kv_cache_mib!r}")
        _check(self.gpu_memory_utilization is None or 0.0 < self.gpu_memory_utilization <= 1.0,
               "gpu_memory_utilization", f"must be in (0, 1] or null, got {self.gpu_memory_utilization!r}")
        _nonnegative(self, "num_cpus", "num_gpus")
        _one_of(self, "allocator", ALLOCATORS)
        _check(isinstance(self.max_staleness, int) and self.max_staleness >= 0, "max_staleness",
               f"must be an integer >= 0, got {self.max_staleness!r}")
        _seed(self)


@dataclass(frozen=True)
class RewardFunctionConfig:
    """One of ``reward.functions``: a Python function scoring batches of responses."""

    path: str = ""  # file.py:function (from the job's working directory) or package.module:function
    weight: float = 1.0  # its factor in the weighted sum of reward components
    name: Optional[str] = None  # its metrics key reward/<name>; null = the function's name

    @property
    def label(self) -> str:
        """Its component name: ``name``, else the function's (ValueError for a malformed path)."""
        from .rewards import split_target

        return self.name or split_target(self.path)[1]


@dataclass(frozen=True)
class RewardConfig:
    """What scores a response: a reward model, a built-in rule, Python functions and a remote
    scorer, as a weighted sum (rlhf_ray/rewards.py). With none of them set, the reward model
    `train-rm` wrote for this run."""

    path: Optional[str] = None  # a reward model directory or hub id; null = the run's own, unless others are set
    model_weight: float = 1.0  # the reward model's factor in the sum
    rule: Optional[str] = None  # a rule from rlhf_ray.rules.RULES (tests, checkable tasks)
    functions: List[RewardFunctionConfig] = field(default_factory=list)  # [{path: file.py:fn, weight: 1.0, name: x}]
    url: Optional[str] = None  # POST JSON batches here and read back scores (a reward served elsewhere)
    url_weight: float = 1.0  # the remote scorer's factor in the sum
    # A classifier with several classes (e.g. a hate-speech model): the reward is this class's
    # score, of the response text alone; a class name of its config's id2label, or an index
    label: Optional[str] = None
    label_score: str = "logit"  # logit (the class's logit) or prob (its softmax probability)
    timeout_s: float = 120.0  # per call of a function or of reward.url
    retries: int = 3  # reward.url: attempts after the first (connection errors, timeouts, 5xx)
    num_actors: int = 1  # reward actors; each step's samples are dealt among them
    batch_size: int = 32  # reward-model forward rows
    num_cpus: float = 0.25  # Ray's logical CPUs per reward actor (bookkeeping)
    num_gpus: float = 0.0  # GPUs per reward actor (0 = CPU; a 7B reward model needs one)

    def __post_init__(self) -> None:
        _positive(self, "batch_size", "timeout_s", "num_actors")
        _nonnegative(self, "retries")
        from .rules import RULES

        _one_of(self, "rule", sorted(RULES), nullable=True)
        _one_of(self, "label_score", ("logit", "prob"))
        _check(self.label is None or str(self.label).strip() != "", "label", "must name a class, or be null")
        _nonnegative(self, "num_cpus", "num_gpus")
        _check(self.url is None or self.url.startswith(("http://", "https://")), "url",
               f"must be an http:// or https:// URL, got {self.url!r}")
        names: list[str] = []
        for i, f in enumerate(self.functions):
            try:
                names.append(f.label)
            except ValueError as e:
                raise _FieldError(f"functions[{i}].path", str(e)) from None
            _check(math.isfinite(f.weight), f"functions[{i}].weight", f"must be finite, got {f.weight!r}")
        for i, name in enumerate(names):
            _check(name not in names[:i] and name not in ("model", "remote", self.rule),
                   f"functions[{i}].name", f"{name!r} names two reward components; give each function a name")

    @property
    def uses_model(self) -> bool:
        """A reward model is loaded: reward.path is set, or nothing else scores."""
        return self.path is not None or (self.rule is None and not self.functions and self.url is None)


@dataclass(frozen=True)
class ReferenceConfig:
    """Reference policy for the KL penalty."""

    # shared_base: the learner computes it from its own base with the adapter off (no second copy);
    # separate: a frozen copy of the base in its own actor (reference.num_gpus places it)
    mode: str = "shared_base"
    num_cpus: float = 0.25  # Ray's logical CPUs of a separate reference actor (bookkeeping)
    num_gpus: float = 0.0  # GPUs of a separate reference actor (0 = CPU; a 7B reference needs one)

    def __post_init__(self) -> None:
        _one_of(self, "mode", ("shared_base", "separate"))
        _nonnegative(self, "num_cpus", "num_gpus")


@dataclass(frozen=True)
class LearnerConfig:
    """Ray Train data-parallel learner."""

    num_workers: int = 2  # Ray Train workers (data-parallel ranks)
    use_gpu: bool = False  # one GPU per worker
    lr: float = 1e-3  # AdamW learning rate of the adapter and value head
    epochs: int = 2  # PPO epochs over each rollout batch
    # Prompts per optimizer step, over all workers together; each brings its
    # rollout.samples_per_prompt samples, so the rows are minibatch_prompts x samples_per_prompt and a
    # PPO step makes epochs x ppo.prompts_per_step / minibatch_prompts optimizer steps whatever the group size.
    minibatch_prompts: int = 16
    micro_batch_size: int = 2  # rows per forward/backward on one worker; gradients accumulate
    # Rows per forward of the no-gradient passes (old and reference log-probs, values): with no
    # graph kept, more rows fit than in training. null = 4 x micro_batch_size.
    inference_micro_batch_size: Optional[int] = None
    gradient_checkpointing: bool = False  # recompute activations in backward: less memory, ~30% more time
    logprob_chunk_tokens: int = 2048  # response tokens whose full-vocabulary logits exist at once
    max_grad_norm: float = 1.0  # gradients are clipped to this global norm
    num_cpus_per_worker: float = 0.5  # Ray's logical CPUs per worker (bookkeeping)
    # What PPO trains: lora (served as a LoRA adapter, hot-swapped), or ssf | repadapter | full, which
    # vLLM cannot serve as an adapter: each version the learner merges them and publishes the changed
    # layers' weights (peft.* settings; full needs reference.mode=separate)
    method: str = "lora"

    def __post_init__(self) -> None:
        _one_of(self, "method", ("lora", "ssf", "repadapter", "full"))
        _check(self.num_workers >= 1, "num_workers", f"must be >= 1, got {self.num_workers!r}")
        _positive(self, "lr", "epochs", "minibatch_prompts", "micro_batch_size", "logprob_chunk_tokens",
                  "max_grad_norm")
        _check(self.num_cpus_per_worker >= 0, "num_cpus_per_worker",
               f"must be >= 0, got {self.num_cpus_per_worker!r}")
        _cap(self, "inference_micro_batch_size")

    @property
    def inference_rows(self) -> int:
        """Rows per no-gradient forward on one worker."""
        return self.inference_micro_batch_size or 4 * self.micro_batch_size


# The off-policy correction's cap when rollouts run ahead of the learner (ppo.tis_cap null):
# the value the truncated-IS literature and verl's rollout correction use.
TIS_CAP_ASYNC = 2.0


@dataclass(frozen=True)
class PPOConfig:
    """PPO objective and schedule."""

    base: str = "sft"  # sft: the SFT stage's model is PPO's base and reference; model: model.path/tiny
    steps: int = 10  # PPO steps (rollout, score, update, publish) of the run
    prompts_per_step: int = 32  # prompts per PPO step (each brings rollout.samples_per_prompt samples), dealt to the engines
    clip_eps: float = 0.2  # the ratio's clip range: [1 - clip_eps, 1 + clip_eps]
    value_clip_eps: float = 0.2  # the value prediction's clip range around the old value
    gamma: float = 1.0  # discount per token (1.0: none)
    lam: float = 0.95  # GAE's lambda (bias-variance trade-off of the advantages)
    vf_coef: float = 0.1  # the value loss's factor in the loss
    entropy_coef: float = 0.0  # the entropy bonus's factor (0 = none)
    kl_coef: float = 0.05  # the KL penalty's factor to the reference (the start value with kl_target)
    kl_estimator: str = "k1"  # KL estimator per token: k1 (log-ratio), k2 (half its square) or k3 (unbiased, non-negative)
    kl_target: Optional[float] = None  # set to use the adaptive KL controller
    kl_horizon: int = 10000  # the adaptive controller's horizon, in samples: how fast kl_coef follows kl_target
    estimator: str = "gae"  # advantage estimator, from rlhf_ray.algo.ESTIMATORS
    whiten_advantages: bool = True  # gae only: the critic-free estimators normalise on their own
    group_std: bool = True  # grpo: divide by the prompt's reward std (dr_grpo never does)
    # reward: -kl_coef * KL_t on every token's reward (PPO, REINFORCE++); loss: kl_coef * KL as a
    # loss term on the learner's own log-probs (GRPO style; use kl_estimator k3 with it).
    kl_in: str = "reward"
    clip_eps_high: Optional[float] = None  # upper clip of the ratio (DAPO clip-higher); null = clip_eps
    ratio_level: str = "token"  # token: PPO's ratio per token; sequence: GSPO's per response
    # token_mean | seq_mean_token_mean | seq_mean_token_sum_norm; null = the estimator's own
    # (dr_grpo: seq_mean_token_sum_norm, over rollout.max_new_tokens; the others token_mean)
    loss_agg: Optional[str] = None
    # A response cut at rollout.max_new_tokens (no EOS): score it as if finished (rewards running
    # to the limit), give it truncated_penalty instead of its score, or mask it (no reward, no loss).
    truncated: str = "penalty"
    truncated_penalty: float = -1.0  # in reward units (the reward model's scores are unit-scale)
    # NaN/inf in rewards, advantages, the loss or the gradients skips that update (counted in the
    # metrics); more than this many bad steps in a row stop the run (the last checkpoint stays valid).
    max_bad_steps: int = 3
    # Truncated importance sampling: the policy term of each token is weighted by
    # min(pi_old / pi_behaviour, tis_cap), pi_behaviour being what the generator sampled with (an
    # older version with rollout.max_staleness > 0, or the engine's numerics). null = on at
    # TIS_CAP_ASYNC when rollout.max_staleness >= 1 (stale samples need it), off when synchronous;
    # 0 = off even then.
    tis_cap: Optional[float] = None
    tis_level: str = "token"  # token | sequence (one weight per response, from its summed log-ratio)

    def __post_init__(self) -> None:
        _one_of(self, "base", ("sft", "model"))
        _positive(self, "steps", "prompts_per_step", "clip_eps", "value_clip_eps", "kl_horizon", "max_bad_steps")
        _unit_interval(self, "gamma", "lam")
        _check(self.vf_coef >= 0, "vf_coef", f"must be >= 0, got {self.vf_coef!r}")
        _check(self.entropy_coef >= 0, "entropy_coef", f"must be >= 0, got {self.entropy_coef!r}")
        _check(self.kl_coef >= 0, "kl_coef", f"must be >= 0, got {self.kl_coef!r}")
        _one_of(self, "kl_estimator", ("k1", "k2", "k3"))
        _check(self.kl_target is None or self.kl_target > 0, "kl_target",
               f"must be > 0 or null, got {self.kl_target!r}")
        from .algo.estimators import ESTIMATORS

        _one_of(self, "estimator", sorted(ESTIMATORS))
        _one_of(self, "kl_in", ("reward", "loss"))
        _check(self.clip_eps_high is None or self.clip_eps_high > 0, "clip_eps_high",
               f"must be > 0 or null, got {self.clip_eps_high!r}")
        _one_of(self, "ratio_level", ("token", "sequence"))
        from .algo.masked import LOSS_AGGREGATIONS

        _one_of(self, "loss_agg", list(LOSS_AGGREGATIONS), nullable=True)
        _check(self.tis_cap is None or self.tis_cap >= 0, "tis_cap",
               f"must be > 0, 0 (off) or null (on when rollout.max_staleness >= 1), got {self.tis_cap!r}")
        _one_of(self, "tis_level", ("token", "sequence"))
        _one_of(self, "truncated", ("score", "penalty", "mask"))


@dataclass(frozen=True)
class GuardConfig:
    """The divergence guard (rlhf_ray/guard.py): each PPO step's record is checked for the signs
    of a run going wrong; each sign past its limit is a warning with the figure and the step."""

    # after `patience` alarmed steps in a row: stop (last good checkpoint and adapter named) | rollback (back
    # to the last good checkpoint with learner.lr x rollback_lr_factor, at most max_rollbacks times, then stop) | warn | off
    action: str = "stop"
    patience: int = 3  # alarmed steps in a row before the action
    kl_factor: float = 3.0  # alarm: KL per response above kl_factor x ppo.kl_target
    kl_max: Optional[float] = None  # alarm: KL per response (nats) above this; null = kl_factor x kl_target (off without one)
    # alarm: share of responses cut at the length limit this far above the warm-up's (not with
    # ppo.truncated=score, where a cut response earns its score and running long is a strategy)
    truncation_rise: float = 0.3
    # Measured on the default task (benchmarks/archive/async.json): a healthy S=1 run mismatches by
    # ~0.02 nats per token with 0.3% of weights over the cap; the S=2 run that collapsed by 0.39 and 2.6%.
    mismatch_max: float = 0.2  # alarm: generator/learner log-prob mismatch (k3, nats per token) above this
    capped_max: float = 0.1  # alarm: share of tokens whose importance weight exceeds ppo.tis_cap (with TIS on)
    reward_drop: float = 1.0  # alarm: reward's moving mean below its best by this many warm-up reward stds
    reward_window: int = 5  # steps in the reward's moving mean
    warmup: int = 3  # first steps that set the truncation and reward baselines (no alarm on those two)
    rollback_lr_factor: float = 0.5  # action=rollback: each rollback multiplies the learning rate by this (0 < f < 1)
    max_rollbacks: int = 2  # action=rollback: rollbacks in one run before the guard stops it instead

    def __post_init__(self) -> None:
        _one_of(self, "action", ("stop", "rollback", "warn", "off"))
        _check(0 < self.rollback_lr_factor < 1, "rollback_lr_factor",
               f"must be between 0 and 1 (a rollback lowers the learning rate), got {self.rollback_lr_factor!r}")
        _positive(self, "max_rollbacks", "patience", "kl_factor", "truncation_rise", "mismatch_max", "capped_max", "reward_drop",
                  "reward_window")
        _nonnegative(self, "warmup")
        _check(self.kl_max is None or self.kl_max > 0, "kl_max", f"must be > 0 or null, got {self.kl_max!r}")


@dataclass(frozen=True)
class ClusterConfig:
    """Where Ray runs. address None: RAY_ADDRESS if set, else a local head started here."""

    address: Optional[str] = None  # a Ray cluster to join (ray://, host:port or auto); null = RAY_ADDRESS, else a local head
    num_cpus: Optional[int] = None  # logical CPUs of a local head; null = Ray's count
    call_timeout_s: float = 600.0  # every remote call that can hang gets this timeout
    # A collective (all-reduce) of the learner's or a stage's ranks that waits longer fails its rank:
    # a broken NCCL path between cards then shows in minutes, not after torch's 30-minute default.
    collective_timeout_s: float = 900.0  # >= the slowest rank's model load, which precedes the first one
    # ...except a new generator's first reply, which waits for its engine to be built and the
    # weights loaded (minutes for a 7B model on a cold node): a hang is told from a slow start.
    start_timeout_s: float = 1800.0
    # The layout `rlhf-ray plan` assumes (its --nodes / --gpu-mem-gib override these).
    nodes: int = 1  # the GPUs are spread evenly over this many nodes
    gpu_memory_gib: float = 23.7  # usable memory of one GPU, as CUDA reports it (an RTX 3090 sold as 24 GB: 23.7 GiB)
    # Rehearsal (`--rehearse`): every role keeps its resource requests and placement, but
    # computes on CPU, so a CPU-only cluster that declares logical GPUs runs the GPU layout.
    rehearse: bool = False
    # A reward, reference or rollout actor that dies (or hangs past call_timeout_s) is started
    # again and its call retried, at most this many times per role over the run.
    max_role_restarts: int = 3
    # The local head's dashboard listens here only; 0.0.0.0 exposes it (and job submission)
    # to the network, which a shared machine should do only behind token authentication.
    dashboard_host: str = "127.0.0.1"
    # token: a local head started here requires Ray's token authentication (its GCS and raylets
    # listen on every interface); a machine with no token yet gets one, as `ray get-auth-token
    # --generate` makes it. ray_default: Ray's own choice (token auth only where a token exists).
    local_auth: str = "token"

    def __post_init__(self) -> None:
        _check(self.num_cpus is None or self.num_cpus >= 1, "num_cpus",
               f"must be >= 1 or null, got {self.num_cpus!r}")
        _positive(self, "call_timeout_s", "start_timeout_s", "nodes", "gpu_memory_gib", "collective_timeout_s")
        _check(self.max_role_restarts >= 0, "max_role_restarts", f"must be >= 0, got {self.max_role_restarts!r}")
        _check(bool(self.dashboard_host), "dashboard_host", "must be a host address, e.g. 127.0.0.1")
        _one_of(self, "local_auth", ("token", "ray_default"))


@dataclass(frozen=True)
class FleetConfig:
    """A generator fleet shared by several runs (`rlhf-ray fleet start`): rollout.num_engines engines built from this config's model and rollout keys, each run attaching with rollout.fleet=<name>."""

    name: str = "fleet"  # the fleet's Ray actors are named after it (namespace rlhf-ray-fleet)
    max_runs: int = 4  # runs attached at once; with max_staleness it sizes each engine's LoRA slots
    max_staleness: int = 1  # the largest rollout.max_staleness of a run it takes: a run holds that + 1 adapter versions
    max_batch_samples: int = 256  # samples in flight in one engine at once; runs take turns for room by their share
    max_model_len: Optional[int] = None  # null = rollout.max_model_len, else data.max_prompt_tokens + rollout.max_new_tokens

    def __post_init__(self) -> None:
        _check(bool(self.name) and all(c.isalnum() or c in "-_." for c in self.name), "name",
               f"must be a non-empty name of letters, digits, '-', '_' or '.', got {self.name!r}")
        _positive(self, "max_runs", "max_batch_samples")
        _check(isinstance(self.max_staleness, int) and self.max_staleness >= 0, "max_staleness",
               f"must be an integer >= 0, got {self.max_staleness!r}")
        _check(self.max_model_len is None or self.max_model_len > 0, "max_model_len",
               f"must be > 0 or null, got {self.max_model_len!r}")


@dataclass(frozen=True)
class OutputConfig:
    """Where a run writes its metrics, adapters and report."""

    dir: str = "runs"  # runs are written to <dir>/<name>
    name: str = "default"  # the run's directory name under output.dir
    save_every: int = 0  # also write <run>/adapter every N PPO steps (0 = only at the end)
    # Where every stage's figures go besides the jsonl files (always written): tensorboard
    # (<run>/tensorboard/<stage>), wandb and mlflow (`pip install 'rlhf-ray[trackers]'`).
    trackers: List[str] = field(default_factory=lambda: ["jsonl", "tensorboard"])

    @property
    def run_dir(self) -> Path:
        return Path(self.dir) / self.name

    def __post_init__(self) -> None:
        # "." or ".." would put the run's files in output.dir itself or above it.
        _check(bool(self.name) and "/" not in self.name and self.name not in (".", ".."), "name",
               f"must be a non-empty name without '/' (and not . or ..), got {self.name!r}")
        _check(self.save_every >= 0, "save_every", f"must be >= 0, got {self.save_every!r}")
        from .tracking import TRACKERS

        unknown = [t for t in self.trackers if t not in TRACKERS]
        _check(not unknown, "trackers", f"{unknown} not among {list(TRACKERS)}")
        _check(len(set(self.trackers)) == len(self.trackers), "trackers", f"names a tracker twice: {self.trackers}")


@dataclass(frozen=True)
class CheckpointConfig:
    """Everything the next PPO step depends on, written atomically to
    ``<run>/checkpoints/step-NNNNNN`` so ``rlhf-ray train --resume`` continues the run."""

    every: int = 0  # PPO steps between checkpoints (0 = none; the final adapter is still saved)
    keep: int = 2  # the newest this many checkpoints are kept, older ones removed

    def __post_init__(self) -> None:
        _nonnegative(self, "every")
        _positive(self, "keep")


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    peft: PeftConfig = field(default_factory=PeftConfig)
    data: DataConfig = field(default_factory=DataConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    rm: RMConfig = field(default_factory=RMConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    guard: GuardConfig = field(default_factory=GuardConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    fleet: FleetConfig = field(default_factory=FleetConfig)

    def __post_init__(self) -> None:
        # Checks that span sections; keys are given in full.
        _check(self.lora.rank <= self.rollout.max_lora_rank, "lora.rank",
               f"{self.lora.rank} exceeds the engines' rollout.max_lora_rank={self.rollout.max_lora_rank}")
        # Every learner rank takes the same share of every minibatch and so the same number of
        # backward passes (DDP all-reduces on each optimizer step).
        lc, n = self.learner, self.rollout.samples_per_prompt
        _check(self.minibatch_rows % lc.num_workers == 0, "learner.minibatch_prompts",
               f"{lc.minibatch_prompts} prompts x rollout.samples_per_prompt={n} = {self.minibatch_rows} rows "
               f"is not divisible by learner.num_workers={lc.num_workers}")
        _check(self.rollout.fleet is None or self.learner.method == "lora", "rollout.fleet",
               f"a shared fleet serves LoRA adapters, but learner.method={self.learner.method} publishes merged "
               "weights: leave rollout.fleet null (the run's own engines)")
        _check(self.rollout.fleet is None or self.rollout.engine != "transformers", "rollout.fleet",
               "a shared fleet is vLLM engines; rollout.engine=transformers runs with engines of its own")
        _check(self.rollout.engine != "transformers" or self.learner.method == "lora", "rollout.engine",
               f"the transformers engine serves LoRA adapters only, but learner.method={self.learner.method}: "
               "use rollout.engine=vllm for merged-weight methods")
        _check(self.learner.method != "full" or self.reference.mode == "separate", "learner.method",
               "full fine-tuning has no adapter to switch off for the reference: set reference.mode=separate "
               "(a second copy of the model)")
        _check(self.guard.action != "rollback" or self.checkpoint.every > 0, "guard.action",
               "rollback goes back to the last good checkpoint, but checkpoint.every is 0 (none is written): "
               "set checkpoint.every (e.g. 5) or use guard.action=stop")
        # The newest checkpoint holds an update no step has judged yet; the one before it is the good one.
        _check(self.guard.action != "rollback" or self.checkpoint.keep >= 2, "checkpoint.keep",
               f"guard.action=rollback needs at least 2 (the newest checkpoint is not yet judged healthy), got "
               f"{self.checkpoint.keep}")
        _check(self.ppo.prompts_per_step % lc.minibatch_prompts == 0, "ppo.prompts_per_step",
               f"{self.ppo.prompts_per_step} prompts are not whole minibatches of learner.minibatch_prompts="
               f"{lc.minibatch_prompts} prompts")

        from .algo.estimators import ESTIMATORS

        _check(not ESTIMATORS[self.ppo.estimator].needs_groups or self.rollout.samples_per_prompt >= 2,
               "rollout.samples_per_prompt", f"ppo.estimator={self.ppo.estimator} compares the samples of a "
               f"prompt and needs at least 2, got {self.rollout.samples_per_prompt}")

    @property
    def tis_cap(self) -> Optional[float]:
        """The truncated importance weights' cap in force, None when off: ppo.tis_cap, or with it
        null, TIS_CAP_ASYNC for an asynchronous run (rollout.max_staleness >= 1)."""
        cap = self.ppo.tis_cap
        if cap is None:
            return TIS_CAP_ASYNC if self.rollout.max_staleness >= 1 else None
        return cap or None

    @property
    def minibatch_rows(self) -> int:
        """Samples per optimizer step over all learner workers: learner.minibatch_prompts prompts,
        each with its rollout.samples_per_prompt samples."""
        return self.learner.minibatch_prompts * self.rollout.samples_per_prompt

    @property
    def loss_agg(self) -> str:
        """The loss aggregation in force: ppo.loss_agg, or the estimator's own."""
        from .algo.estimators import ESTIMATORS

        return self.ppo.loss_agg or ESTIMATORS[self.ppo.estimator].loss_agg

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _plain_values(obj: Any) -> None:
    """What no type check catches: NaN/inf, which slip past every range check written as a
    comparison, and NUL, which no path or name can hold (``open`` fails far from the key)."""
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        if isinstance(v, float) and not math.isfinite(v):
            raise _FieldError(f.name, f"must be finite, got {v!r}")
        if isinstance(v, str) and "\x00" in v:
            raise _FieldError(f.name, f"must not contain a NUL character, got {v!r}")


def first_line(e: BaseException) -> str:
    """An error's first line (OmegaConf, datasets and huggingface_hub append detail lines the
    key or file in our own message already says), or its type when it has no text."""
    return str(e).splitlines()[0] if str(e) else type(e).__name__


# -- the shape of a layer, before OmegaConf sees it ------------------------------------------
# OmegaConf names no key when a section is a list or a scalar ("Merge error: list is not a
# subclass of LoraConfig"), keeps the default without a word for '???' (its missing marker) or
# a list of lists where a list of names goes, and raises exceptions of other libraries for
# YAML dates, sets and binary, or for integers too large for a float field (OverflowError).
_SCALARS = (str, int, float, bool, type(None))
_INT_LIMIT = 2 ** 63  # no setting takes more; a larger one only overflows far from its key


def _sections() -> dict[str, type]:
    return {f.name: f.default_factory for f in dataclasses.fields(Config)}  # type: ignore[misc]


def _list_keys(cls: type) -> set[str]:
    """Keys of a section whose type is a list (``List[str]`` or ``Optional[List[str]]``)."""
    is_list = lambda tp: typing.get_origin(tp) is list
    hints = typing.get_type_hints(cls)
    return {k for k, tp in hints.items() if is_list(tp) or any(map(is_list, typing.get_args(tp)))}


def _record_item(cls: type, key: str) -> Optional[type]:
    """The dataclass of a key that is a list of records (``reward.functions``), else None."""
    tp = typing.get_type_hints(cls).get(key)
    args = typing.get_args(tp) if typing.get_origin(tp) is list else ()
    return args[0] if args and dataclasses.is_dataclass(args[0]) else None


def _check_record(item: Any, cls: type, where: str, key: str) -> dict:
    """One record of such a list: a mapping of the dataclass's keys, or text, which is its
    first key (``- file.py:fn`` for ``- {path: file.py:fn}``)."""
    known = [f.name for f in dataclasses.fields(cls)]
    if isinstance(item, str):
        return {known[0]: item}
    if not isinstance(item, dict):
        raise ConfigError(f"{where}: {key}: must be a mapping of {', '.join(known)} (or text: the {known[0]}), "
                          f"got {_kind(item)}")
    for k, v in item.items():
        _check_name(k, where, f"{key}.")
        if k not in known:
            raise ConfigError(f"{where}: {key}.{k}: unknown key; it has {', '.join(known)}")
        _check_value(v, where, f"{key}.{k}")
    return item


def _kind(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, dict):
        return "a mapping"
    if isinstance(v, list):
        return f"a list {v!r}"[:80]
    return f"{type(v).__name__} {v!r}"[:80]


def _check_name(key: Any, where: str, prefix: str) -> None:
    if not isinstance(key, str) or not key:
        raise ConfigError(f"{where}: {prefix}{key!r}: a key must be a name, got {type(key).__name__} "
                          "(YAML reads unquoted yes/no/on/off as booleans and digits as numbers)")


def _check_value(v: Any, where: str, key: str, in_list: bool = False) -> None:
    if isinstance(v, (dict, list)):
        what = "an item of a list" if in_list else "a single value"
        raise ConfigError(f"{where}: {key}: must be {what}, got {_kind(v)}")
    if not isinstance(v, _SCALARS):
        raise ConfigError(f"{where}: {key}: {type(v).__name__} values are not supported, got {v!r} "
                          "(quote it to make it text)")
    if in_list and v is None:
        raise ConfigError(f"{where}: {key}: null is not a list item")
    if isinstance(v, int) and not isinstance(v, bool) and abs(v) >= _INT_LIMIT:
        # Not printed: str() of an int beyond 4300 digits raises.
        raise ConfigError(f"{where}: {key}: out of range, an integer of {v.bit_length()} bits (at most 63)")
    if v == "???":
        raise ConfigError(f"{where}: {key}: '???' marks a missing value in OmegaConf; "
                          "give a value or leave the key out")


# Keys renamed to say what they count or hold; the old names still load, with one warning each.
RENAMED_KEYS = {
    "rollout.num_actors": "rollout.num_engines",  # they are vLLM engines, not "the actor" (the policy) of OpenRLHF/verl
    "ppo.batch_size": "ppo.prompts_per_step",  # prompts, not samples: each brings rollout.samples_per_prompt
    "learner.minibatch_size": "learner.minibatch_prompts",  # prompts over all workers, not rows per worker
    "sft.mode": "sft.method",  # one of several fine-tuning methods now, not a full/lora switch
    "rm.mode": "rm.method",
}
RENAMED_VALUES = {"reference.mode": {"actor": "separate"}}
_warned: set[str] = set()


def _renamed(old: str, new: str) -> None:
    if old not in _warned:
        _warned.add(old)
        import logging

        logging.getLogger("rlhf_ray.config").warning("%s is now called %s; the old name still works", old, new)


def _new_name(body: dict, section: str, key: str, where: str) -> tuple[str, Any]:
    """(key, value) with a renamed key or value replaced by its new name in ``body``."""
    old = f"{section}.{key}"
    if old in RENAMED_KEYS:
        new = RENAMED_KEYS[old].split(".", 1)[1]
        if new in body:
            raise ConfigError(f"{where}: {old} and {section}.{new} are both given; {old} is the old name of "
                              f"{section}.{new}: keep one")
        _renamed(old, RENAMED_KEYS[old])
        body[new] = body.pop(key)
        key = new
    value = body[key]
    values = RENAMED_VALUES.get(f"{section}.{key}", {})
    if isinstance(value, str) and value in values:
        _renamed(f"{section}.{key}={value}", f"{section}.{key}={values[value]}")
        value = body[key] = values[value]
    return key, value


def _unknown_hint(section: str, key: str, known: list[str], sections: dict[str, type]) -> str:
    """A close key of the section, else the section(s) where a key of that name lives."""
    hint = _did_you_mean(key, known)
    if hint:
        return hint
    elsewhere = [f"{s}.{key}" for s, cls in sections.items()
                 if s != section and key in {f.name for f in dataclasses.fields(cls)}]
    return f" (it is {' or '.join(elsewhere)})" if elsewhere else ""


def _check_layer(raw: Any, where: str, *, null_sections: bool) -> dict:
    """``raw`` (a parsed YAML file or override) checked against the sections' shapes; with
    ``null_sections`` a section given as null is left out (its keys all commented out)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: the top level must be a mapping of sections, got {_kind(raw)}")
    sections, out = _sections(), {}
    for name, body in raw.items():
        _check_name(name, where, "")
        if name not in sections:
            raise ConfigError(f"{where}: {name}: unknown section{_did_you_mean(name, sections)}; "
                              f"the sections are {', '.join(sections)}")
        if body is None and null_sections:
            continue
        known = [f.name for f in dataclasses.fields(sections[name])]
        if not isinstance(body, dict):
            raise ConfigError(f"{where}: {name}: must be a mapping of {name}'s keys ({', '.join(known)}), "
                              f"got {_kind(body)}")
        lists = _list_keys(sections[name])
        for key in list(body):
            _check_name(key, where, f"{name}.")
            key, value = _new_name(body, name, key, where)
            dotted = f"{name}.{key}"
            if key not in known:
                raise ConfigError(f"{where}: {dotted}: unknown key{_unknown_hint(name, key, known, sections)}; "
                                  f"{name} has {', '.join(known)}")
            item_type = _record_item(sections[name], key)
            if item_type is not None and isinstance(value, list):
                body[key] = [_check_record(item, item_type, where, f"{dotted}[{i}]") for i, item in enumerate(value)]
            elif key not in lists:
                _check_value(value, where, dotted)
            elif isinstance(value, list):
                for i, item in enumerate(value):
                    _check_value(item, where, f"{dotted}[{i}]", in_list=True)
            elif value is not None:
                raise ConfigError(f"{where}: {dotted}: must be a list such as [a, b] (set it whole), "
                                  f"got {_kind(value)}")
        out[name] = body
    return out


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML keeps the last of two equal keys silently: a second ``ppo:`` section would
    drop the first one's settings without a word."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *anchor` overriding keys is what it is for
            key = self.construct_object(key_node, deep=deep)
            try:
                first = seen.get(key)
            except TypeError:
                continue  # unhashable: the base class says so with its position
            if first is not None:
                raise yaml.constructor.ConstructorError(
                    "while reading a mapping", node.start_mark, f"key {key!r} given twice (first on line {first})",
                    key_node.start_mark)
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


def _read_yaml(path: str | Path) -> Any:
    source, p = str(path), Path(path)
    if not p.is_file():
        raise ConfigError(f"{source}: config file not found")
    try:
        data = p.read_bytes()
    except OSError as e:
        raise ConfigError(f"{source}: cannot read the config file ({e.strerror or e})") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise ConfigError(f"{source}: line {line}: not UTF-8 text (byte {data[e.start]:#04x})") from None
    stream = io.StringIO(text)
    stream.name = source  # YAML's marks then name the file, not "<unicode string>"
    try:
        return yaml.load(stream, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as e:  # its text carries line and column
        raise ConfigError(f"{source}: cannot parse YAML: {e}") from None
    except (ValueError, RecursionError) as e:  # e.g. an integer of more than 4300 digits; nesting too deep
        raise ConfigError(f"{source}: cannot parse YAML: {first_line(e)}") from None


def _merge(layers: list, where: str, key: str = "") -> Any:
    try:
        return OmegaConf.merge(*layers)
    except OmegaConfBaseException as e:  # a value of the wrong type; the shapes were checked already
        raise ConfigError(f"{where}: {e.full_key or key}: {first_line(e)}") from None


def _build(merged: Any, source: str) -> Config:
    sections = {}
    for f in dataclasses.fields(Config):
        try:
            obj = OmegaConf.to_object(merged[f.name])
            _plain_values(obj)
        except _FieldError as e:
            raise ConfigError(f"{source}: {f.name}.{e.key}: {e}") from None
        except OmegaConfBaseException as e:
            # Interpolation errors carry the full dotted key, conversion errors the section's.
            key = e.full_key or ""
            key = key if key == f.name or key.startswith(f"{f.name}.") else f"{f.name}.{key}".rstrip(".")
            raise ConfigError(f"{source}: {key}: {first_line(e)}") from None
        except (TypeError, ValueError, OverflowError, RecursionError) as e:  # e.g. an interpolated value
            raise ConfigError(f"{source}: {f.name}: {type(e).__name__}: {first_line(e)}") from None
        sections[f.name] = obj
    try:
        return Config(**sections)
    except _FieldError as e:
        raise ConfigError(f"{source}: {e.key}: {e}") from None


def load_config(path: str | Path | Sequence[str | Path] | None = None, overrides: Iterable[str] = ()) -> Config:
    """Load a YAML config (or the defaults when ``path`` is None; several files are layered, each
    over the ones before) and apply ``key.sub=value`` overrides.

    Raises:
        ConfigError: missing/unreadable/unparsable file, a section that is not a mapping, unknown
            key, wrong type or out-of-range value; the message names the file (or "override")
            and the dotted key. Nothing else escapes, whatever the file or overrides hold.
    """
    schema = OmegaConf.structured(Config)
    # Frozen dataclasses make a read-only schema; merging needs it writable, and the
    # result is frozen again when the dataclasses are built.
    OmegaConf.set_readonly(schema, False)
    paths = [] if path is None else [path] if isinstance(path, (str, Path)) else list(path)
    source = " + ".join(map(str, paths)) or "<defaults>"
    merged = schema
    for p in paths:
        raw = _read_yaml(p)
        # An empty file means all defaults, as does a section with every key commented out.
        merged = _merge([merged, _check_layer({} if raw is None else raw, str(p), null_sections=True)], str(p))
    overrides = list(overrides)
    for ov in overrides:
        where = f"{source}: override {ov!r}"
        if not isinstance(ov, str) or "=" not in ov:
            key = str(ov).strip().lstrip("-")
            if isinstance(ov, str) and key.split(".")[0] in _sections():
                raise ConfigError(f"{where}: give the value after '=' in one word: {key}=VALUE")
            raise ConfigError(f"{where}: expected key.sub=value")
        key = ov.split("=", 1)[0].strip()
        if not all(key.split(".")):
            raise ConfigError(f"{where}: {key!r} is not a dotted key such as ppo.clip_eps")
        try:
            layer = OmegaConf.to_container(OmegaConf.from_dotlist([ov]), resolve=False)
        except (OmegaConfBaseException, yaml.YAMLError, ValueError, RecursionError) as e:  # the value is YAML
            raise ConfigError(f"{where}: {key}: cannot parse the value ({first_line(e)})") from None
        merged = _merge([merged, _check_layer(layer, where, null_sections=False)], where, key)
    if overrides:
        source += " (with overrides " + " ".join(overrides) + ")"
    return _build(merged, source)


def dump_config(cfg: Config) -> str:
    """The resolved config as YAML, e.g. to store beside a run's outputs."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
