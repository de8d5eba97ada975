"""The ChemGPT training task: SELFIES corpus -> ChemGPT -> next-token loss in nats per token.

`chemscale.train` calls `build(config, ...)` for runs with `"task": "chemgpt"`, under the contract
of `chemscale.task` (a sample is a token; result.json names them so). A run config
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
from chemscale.lm.read import CorpusError, moses_path
from chemscale.lm.tokenizer import PAD_ID
from chemscale.lm.vocabulary import keep_vocabulary
from chemscale.task import TaskModule


@dataclass
class LMDataConfig:
    """Which molecules a run trains and validates on."""

    source: str = "moses"  # 'moses' or a path to a PubChem CID-SMILES, .smi/.txt or .csv(.gz) file
    n_train_molecules: int = 1000  # nested subsets: the first n of a fixed permutation
    n_val_molecules: int = 1000  # fixed validation subset (MOSES: its test split)

    def __post_init__(self):
        require(self.n_train_molecules > 0, "n_train_molecules", "must be > 0")
        require(self.n_val_molecules > 0, "n_val_molecules", "must be > 0")


SECTIONS = {"model": chemgpt.ChemGPTShape, "data": LMDataConfig}  # config sections this task reads
EXTRA_COLUMNS: tuple[str, ...] = ()  # metrics.csv has the runner's columns only


class Task:
    """What `build` gives the runner (`chemscale.task.RunTask`): module, loaders, end-of-run summaries."""

    def __init__(self, module: ChemGPTModule, train_loader, val_loader, train_corpus, n_asked: tuple[int, int],
                 n_fitting: tuple[int, int], dropped: int):
        self.module, self.train_loader, self.val_loader = module, train_loader, val_loader
        self.train_corpus, self.dropped_too_long = train_corpus, dropped
        self.n_train_asked, self.n_val_asked = n_asked  # the config's numbers
        self.n_train, self.n_val = n_fitting  # molecules that fit n_positions: what the run trains on

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
            "train_tokens_per_s": m.samples_this_process / max(train_seconds, 1e-9),
        }

    def finish(self, run_dir: Path) -> dict:
        return {}


class ChemGPTModule(TaskModule):
    """Next-token cross-entropy (nats per token, padding masked) on SELFIES token ids: a sample is a token."""

    def __init__(self, model: chemgpt.ChemGPT, tcfg, context: int | None = None):
        super().__init__(model, tcfg)
        self.flops_per_sample = model.flops_per_token(context)  # attention term at the mean sequence length

    def step_loss(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean loss over the non-padding targets, and how many there are."""
        inputs, targets = batch[:, :-1], batch[:, 1:]
        _, loss = self.model(inputs, targets)
        return loss, (targets != PAD_ID).sum()

    def val_sums(self, batch) -> torch.Tensor:
        loss, count = self.step_loss(batch)
        return torch.stack([loss.double() * count, count.double()])

    def make_optimizer(self) -> torch.optim.Optimizer:
        """The model's AdamW (`ChemGPT.configure_optimizer`): matrices decayed, biases and norms not; fused kernels."""
        return self.model.configure_optimizer(lr=self.lr, weight_decay=self.weight_decay)


def make_model(shape: chemgpt.ChemGPTShape, vocab_size: int) -> chemgpt.ChemGPT:
    """ChemGPT of a run's shape and its corpus's vocabulary."""
    return chemgpt.ChemGPT(chemgpt.ChemGPTConfig(vocab_size=vocab_size, **asdict(shape)))


def load_data(data_cfg: LMDataConfig, seed: int, progress: bool = False):
    """Training and validation corpora (validation mapped onto the training vocabulary)."""
    train = corpus.load(data_cfg.source, "train", data_cfg.n_train_molecules, seed=seed, progress=progress)
    val = corpus.load(data_cfg.source, "val", data_cfg.n_val_molecules, seed=seed, tokenizer=train.tokenizer,
                      progress=progress)
    return train, val


def build(config: dict, tcfg, run_dir: Path, source: str) -> Task:
    """Build the ChemGPT task of a run config (sections `model`, `data`)."""
    shape = from_dict(chemgpt.ChemGPTShape, config.get("model", {}), f"{source} [model]")
    data_cfg = from_dict(LMDataConfig, config.get("data", {}), f"{source} [data]")
    seed = int(config.get("seed", 0))
    train_corpus, val_corpus = load_data(data_cfg, seed=0)  # data seed fixed: nested subsets across seeds
    keep_vocabulary(run_dir, train_corpus.tokenizer, data_cfg.source)
    train_idx = loader.fitting(train_corpus, shape.n_positions)
    val_idx = loader.fitting(val_corpus, shape.n_positions)
    _check_fitting(train_corpus, train_idx, "training", shape.n_positions, source)
    _check_fitting(val_corpus, val_idx, "validation", shape.n_positions, source)
    model = make_model(shape, len(train_corpus.tokenizer))
    mean_len = float(np.diff(np.asarray(train_corpus.offsets))[train_idx].mean()) + 1  # + [BOS] or [EOS]
    module = ChemGPTModule(model, tcfg, context=round(mean_len))
    # global_step: optimizer steps taken, restored from the checkpoint on resume
    train_loader = loader.train_loader(train_corpus, train_idx, tcfg.batch_size, seed,
                                       steps_done=lambda: module.global_step)
    val_loader = loader.val_loader(val_corpus, val_idx, tcfg.batch_size)
    dropped = (len(train_corpus) - len(train_idx)) + (len(val_corpus) - len(val_idx))
    return Task(module, train_loader, val_loader, train_corpus, (data_cfg.n_train_molecules, data_cfg.n_val_molecules),
                (len(train_idx), len(val_idx)), dropped)


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

    With `data`, also check that the training split holds `n_train_molecules` molecules and the
    validation split `n_val_molecules`: the corpus would otherwise give fewer without a word, and
    runs asking for different sizes would train on the same set. A sweep checks once per source,
    with its largest sizes, before any run starts. MOSES encodes without loss, so its line count
    decides at once; a user file is encoded up to that size (what its first run would do anyway;
    cached, so cheap later).
    """
    import gzip
    import warnings

    from chemscale.config import ConfigError

    from_dict(chemgpt.ChemGPTShape, config.get("model", {}), f"{source} [model]")
    data_cfg = from_dict(LMDataConfig, config.get("data", {}), f"{source} [data]")
    if not data:
        return
    for split, key, name in (("train", "n_train_molecules", "training"), ("val", "n_val_molecules", "validation")):
        n = getattr(data_cfg, key)
        if data_cfg.source == "moses":
            with gzip.open(moses_path(split), "rb") as f:  # ~0.3 s; one header line
                available = sum(block.count(b"\n") for block in iter(lambda: f.read(1 << 22), b"")) - 1
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
