"""The ChemGPT training task: SELFIES corpus -> ChemGPT -> next-token loss in nats per token.

`chemscale.train` calls `build(config, ...)` for runs with `"task": "chemgpt"`, under the contract
of `chemscale.task` (a sample is a token; result.json names them so). Early stopping and the
choice of best.pt use the validation split; at the end, the best model's loss on the test split,
which neither ever saw, is result.json's `test_loss`. A run config
has three sections, each a dataclass validated on load: `model` (`chemgpt.ChemGPTShape`, the
model's own shape), `data` (`LMDataConfig`) and `train` (`chemscale.run_config.TrainConfig`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from chemscale.config import from_dict, require
from chemscale.lm import chemgpt, corpus, loader
from chemscale.lm.cache import split_size
from chemscale.lm.read import CorpusError, moses_path
from chemscale.lm.tokenizer import PAD_ID
from chemscale.lm.vocabulary import keep_vocabulary
from chemscale.task import BEST, TaskModule, throughput


@dataclass
class LMDataConfig:
    """Which molecules a run trains, validates and tests on (the splits: `chemscale.lm.cache.split_range`)."""

    source: str = "moses"  # 'moses' or a path to a PubChem CID-SMILES, .smi/.txt or .csv(.gz) file
    n_train_molecules: int = 1000  # nested subsets: the first n of a fixed permutation
    n_val_molecules: int = 1000  # fixed validation subset (MOSES: from its test file): early stopping, best.pt
    # fixed test subset, the same for every run of a source: best.pt's test_loss. At most the test split's size
    # (MOSES: 10,000 lines of its test file, apart from validation's; a user file: min(10%, 10,000) of its lines)
    n_test_molecules: int = 2000

    def __post_init__(self):
        require(self.n_train_molecules > 0, "n_train_molecules", "must be > 0")
        require(self.n_val_molecules > 0, "n_val_molecules", "must be > 0")
        require(self.n_test_molecules > 0, "n_test_molecules", "must be > 0")


SECTIONS = {"model": chemgpt.ChemGPTShape, "data": LMDataConfig}  # config sections this task reads
EXTRA_COLUMNS: tuple[str, ...] = ()  # metrics.csv has the runner's columns only


class Task:
    """What `build` gives the runner (`chemscale.task.RunTask`): module, loaders, end-of-run summaries."""

    def __init__(self, module: ChemGPTModule, train_loader, val_loader, test_loader, train_corpus,
                 n_asked: tuple[int, int, int], n_fitting: tuple[int, int, int], dropped: int):
        self.module, self.train_loader, self.val_loader = module, train_loader, val_loader
        self.test_loader = test_loader  # read by `finish` only
        self.train_corpus, self.dropped_too_long = train_corpus, dropped  # training and validation molecules
        self.n_train_asked, self.n_val_asked, self.n_test_asked = n_asked  # the config's numbers
        self.n_train, self.n_val, self.n_test = n_fitting  # molecules that fit n_positions: what the run uses

    def summary(self, best_val: float | None, train_seconds: float) -> dict:
        """result.json's ChemGPT entries; the module's samples are tokens, named so here."""
        m = self.module
        return {
            "n_params": m.model.n_params(non_embedding=False),
            "n_params_non_embedding": m.model.n_params(non_embedding=True),
            "flops_per_token": m.flops_per_sample,
            "n_train_molecules": self.n_train,  # trained on (a fit's x); the config's number is the asked one
            "n_train_molecules_asked": self.n_train_asked,
            "n_val_molecules": self.n_val,
            "n_val_molecules_asked": self.n_val_asked,
            "dropped_too_long": self.dropped_too_long,
            "vocab_size": m.model.config.vocab_size,
            "tokens_seen": m.samples_seen,
            "tokens_at_best": m.samples_at_best,
            "flops_at_best": m.flops_per_sample * m.samples_at_best,
            "flops_total": m.flops_per_sample * m.samples_seen,
            "train_tokens_per_s": throughput(m.samples_this_process, train_seconds),
        }

    def finish(self, run_dir: Path) -> dict:
        """Loss of the best model (best.pt) on the test split, in nats per token as val_loss.

        best_val_loss is the minimum over the validations that chose best.pt, so it is biased low
        (most for small data, where validation is noisiest); test_loss is measured on molecules
        neither early stopping nor that choice saw. It is computed from best.pt on the CPU in
        float32 (whatever the training precision), so a resumed run writes the number the
        uninterrupted one would. Eager even where train.compile compiled the blocks: a CPU compile would cost
        minutes (inductor) for one pass. `n_test_molecules` counts the test molecules that fit n_positions."""
        model = self.module.model
        if (run_dir / BEST).exists():
            model.load_state_dict(torch.load(run_dir / BEST, map_location="cpu", weights_only=True))
        with torch.compiler.set_stance("force_eager"):
            test_loss = mean_loss(model.float().cpu(), self.test_loader)
        return {"test_loss": test_loss, "n_test_molecules": self.n_test, "n_test_molecules_asked": self.n_test_asked}


def loss_and_count(model: chemgpt.ChemGPT, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean next-token loss over a batch's non-padding targets, and how many there are."""
    inputs, targets = batch[:, :-1], batch[:, 1:]
    _, loss = model(inputs, targets)
    return loss, (targets != PAD_ID).sum()


def mean_loss(model: chemgpt.ChemGPT, batches) -> float:
    """Nats per token over every non-padding target of `batches` (padded batches, as `loader` makes them).

    Summed as validation sums them (loss·count, count; float64), in evaluation mode without gradients."""
    total = count = 0.0
    model.eval()
    with torch.no_grad():
        for batch in batches:
            loss, n = loss_and_count(model, batch.to(next(model.parameters()).device))
            total, count = total + float(loss.double() * n), count + float(n)
    return total / count


class ChemGPTModule(TaskModule):
    """Next-token cross-entropy (nats per token, padding masked) on SELFIES token ids: a sample is a token."""

    def __init__(self, model: chemgpt.ChemGPT, tcfg, context: int | None = None):
        super().__init__(model, tcfg)
        self.flops_per_sample = model.flops_per_token(context)  # attention term at the mean sequence length

    def step_loss(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean loss over the non-padding targets, and how many there are."""
        return loss_and_count(self.model, batch)

    def val_sums(self, batch) -> torch.Tensor:
        loss, count = self.step_loss(batch)
        return torch.stack([loss.double() * count, count.double()])

    def make_optimizer(self) -> torch.optim.Optimizer:
        """The model's AdamW (`ChemGPT.configure_optimizer`): matrices decayed, biases and norms not; fused kernels."""
        return self.model.configure_optimizer(lr=self.lr, weight_decay=self.weight_decay)


def make_model(shape: chemgpt.ChemGPTShape, vocab_size: int) -> chemgpt.ChemGPT:
    """ChemGPT of a run's shape and its corpus's vocabulary."""
    return chemgpt.ChemGPT(chemgpt.ChemGPTConfig(vocab_size=vocab_size, **asdict(shape)))


def compile_blocks(model: chemgpt.ChemGPT, backend: str) -> None:
    """Compile each transformer block in place with torch.compile's `backend` (`TrainConfig.compile`).

    In place (`nn.Module.compile`), so the parameters keep their names: state_dict, checkpoints, best.pt and the
    Hugging Face export read as without compiling. Blocks, not the whole model, so the loss's boolean-mask
    gather of non-padding positions (a data-dependent shape) stays eager. "inductor" is the backend to use on
    GPUs; tests check the dynamo path (tracing, AOT autograd) with "aot_eager" instead, which generates no code:
    inductor compiled a 2-block, width-16 model in 165 s on a busy 2-core CPU (twice: static shapes, then
    dynamic ones at the second sequence length), too long for `make test`; its loss was within 5e-7 of eager.
    """
    for block in model.blocks:
        block.compile(backend=backend)


def load_data(data_cfg: LMDataConfig, seed: int, progress: bool = False):
    """Training and validation corpora (validation mapped onto the training vocabulary)."""
    train = corpus.load(data_cfg.source, "train", data_cfg.n_train_molecules, seed=seed, progress=progress)
    val = corpus.load(data_cfg.source, "val", data_cfg.n_val_molecules, seed=seed, tokenizer=train.tokenizer,
                      progress=progress)
    return train, val


def load_test(data_cfg: LMDataConfig, tokenizer, progress: bool = False) -> corpus.TokenCorpus:
    """The test corpus, mapped onto the training vocabulary `tokenizer`: the same molecules for every run of a
    source (seed 0, whatever the run's seed and other sizes)."""
    return corpus.load(data_cfg.source, "test", data_cfg.n_test_molecules, seed=0, tokenizer=tokenizer,
                       progress=progress)


def build(config: dict, tcfg, run_dir: Path, source: str) -> Task:
    """Build the ChemGPT task of a run config (sections `model`, `data`)."""
    shape = from_dict(chemgpt.ChemGPTShape, config.get("model", {}), f"{source} [model]")
    data_cfg = from_dict(LMDataConfig, config.get("data", {}), f"{source} [data]")
    seed = int(config.get("seed", 0))
    train_corpus, val_corpus = load_data(data_cfg, seed=0)  # data seed fixed: nested subsets across seeds
    test_corpus = load_test(data_cfg, train_corpus.tokenizer)
    keep_vocabulary(run_dir, train_corpus.tokenizer, data_cfg.source)
    train_idx, val_idx, test_idx = (loader.fitting(c, shape.n_positions)
                                    for c in (train_corpus, val_corpus, test_corpus))
    _check_fitting(train_corpus, train_idx, "training", shape.n_positions, source)
    _check_fitting(val_corpus, val_idx, "validation", shape.n_positions, source)
    _check_fitting(test_corpus, test_idx, "test", shape.n_positions, source)
    model = make_model(shape, len(train_corpus.tokenizer))
    if tcfg.compile:
        compile_blocks(model, tcfg.compile)
    mean_len = float(np.diff(np.asarray(train_corpus.offsets))[train_idx].mean()) + 1  # + [BOS] or [EOS]
    module = ChemGPTModule(model, tcfg, context=round(mean_len))
    # global_step: optimizer steps taken, restored from the checkpoint on resume
    train_loader = loader.train_loader(train_corpus, train_idx, tcfg.batch_size, seed,
                                       steps_done=lambda: module.global_step)
    val_loader = loader.val_loader(val_corpus, val_idx, tcfg.batch_size)
    test_loader = loader.val_loader(test_corpus, test_idx, tcfg.batch_size)
    dropped = (len(train_corpus) - len(train_idx)) + (len(val_corpus) - len(val_idx))
    asked = (data_cfg.n_train_molecules, data_cfg.n_val_molecules, data_cfg.n_test_molecules)
    return Task(module, train_loader, val_loader, test_loader, train_corpus, asked,
                (len(train_idx), len(val_idx), len(test_idx)), dropped)


def _check_fitting(tokens: corpus.TokenCorpus, fitting: np.ndarray, split: str, n_positions: int, source: str):
    """Refuse a run in which no molecule of a split fits the context (it would crash or train on nothing)."""
    if len(fitting):
        return
    from chemscale.config import ConfigError

    shortest = int(np.diff(np.asarray(tokens.offsets)).min()) + 2
    raise ConfigError(f"{source} [model]: n_positions = {n_positions}, but none of the {len(tokens):,} {split} "
                      f"molecules fits (the shortest needs {shortest} positions with [BOS] and [EOS]); "
                      f"raise n_positions")


def validate(config: dict, source: str, *, data: bool = False, progress: bool = False) -> None:
    """Check the `model` and `data` sections of a ChemGPT run config.

    With `data`, also check that the training split holds `n_train_molecules` molecules, the
    validation split `n_val_molecules` and the test split `n_test_molecules`: the corpus would
    otherwise give fewer without a word, and runs asking for different sizes would train on the
    same set. A sweep checks once per source, with its largest sizes, before any run starts.
    MOSES encodes without loss, so its split's line count decides at once; a user file is encoded
    up to that size (what its first run would do anyway; cached, so cheap later).
    """
    import gzip
    import warnings

    from chemscale.config import ConfigError

    from_dict(chemgpt.ChemGPTShape, config.get("model", {}), f"{source} [model]")
    data_cfg = from_dict(LMDataConfig, config.get("data", {}), f"{source} [data]")
    if not data:
        return
    for split, key, name in (("train", "n_train_molecules", "training"), ("val", "n_val_molecules", "validation"),
                             ("test", "n_test_molecules", "test")):
        n = getattr(data_cfg, key)
        if data_cfg.source == "moses":
            with gzip.open(moses_path(split), "rb") as f:  # ~0.3 s; one header line
                n_lines = sum(block.count(b"\n") for block in iter(lambda: f.read(1 << 22), b"")) - 1
            available = split_size(n_lines, True, split)
        else:
            with warnings.catch_warnings():  # the shortfall is reported below, as an error
                warnings.simplefilter("ignore")
                try:
                    available = len(corpus.load(data_cfg.source, split, n, seed=0, progress=progress))
                except CorpusError as e:
                    raise ConfigError(f"{source} [data]: source {data_cfg.source!r}: {e}") from None
        if available < n:
            raise ConfigError(f"{source} [data]: {key} = {n:,}, but the {name} split of "
                              f"{data_cfg.source!r} leaves {available:,} molecules that encode; "
                              f"ask for at most {available:,}")
