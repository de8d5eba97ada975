"""ChemGPT against Hugging Face GPT-Neo (golden parity), sizes, padding and local attention."""

from pathlib import Path

import pytest
import torch

from chemscale.lm.chemgpt import ChemGPT, ChemGPTConfig, preset_heads
from chemscale.lm.tokenizer import BOS_ID, EOS_ID, PAD_ID

transformers = pytest.importorskip("transformers")


def _random_hf(seed=0):
    torch.manual_seed(seed)
    config = transformers.GPTNeoConfig(
        vocab_size=40, max_position_embeddings=64, hidden_size=32, num_layers=4, num_heads=4, window_size=8,
        attention_types=[[["global", "local"], 2]], resid_dropout=0.0, embed_dropout=0.0, attention_dropout=0.0,
        bos_token_id=BOS_ID, eos_token_id=EOS_ID)
    hf = transformers.GPTNeoForCausalLM(config).eval()
    with torch.no_grad():
        for p in hf.parameters():  # larger than the 0.02 init so differences would show
            p.normal_(0, 0.3)
    return hf


def _greedy_hf(hf, n_new):
    ids = torch.full((2, 1), BOS_ID)
    for _ in range(n_new):
        nxt = hf(ids).logits[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], 1)
    return ids[:, 1:]


def test_hf_to_chemgpt_same_logits_and_greedy_samples():
    hf = _random_hf()
    model = ChemGPT.from_hf(hf)
    x = torch.randint(4, 40, (3, 30))  # longer than the local window of 8
    with torch.no_grad():
        torch.testing.assert_close(model(x)[0], hf(x).logits, atol=1e-5, rtol=0)
        ours = model.sample(2, max_len=21, temperature=0)
        theirs = _greedy_hf(hf, 20).tolist()
    for a, b in zip(ours, theirs):
        assert a == (b[: b.index(EOS_ID)] if EOS_ID in b else b)


def test_chemgpt_to_hf_same_logits():
    torch.manual_seed(1)
    model = ChemGPT(ChemGPTConfig(vocab_size=40, width=32, depth=3, n_heads=4, n_positions=64, window_size=8,
                                  attention_layers="global_local"))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    hf = model.to_hf()
    x = torch.randint(4, 40, (2, 40))
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, model(x)[0], atol=1e-5, rtol=0)
    assert ChemGPT.from_hf(hf).state_dict().keys() == model.state_dict().keys()


@pytest.mark.parametrize("width,expected", [(128, 4.75e6), (256, 18.9e6)])
def test_published_chemgpt_sizes(width, expected):
    model = ChemGPT(ChemGPTConfig(vocab_size=684, width=width, depth=24, n_heads=16))
    assert model.n_params(non_embedding=True) == pytest.approx(expected, rel=0.005)
    assert model.n_params(non_embedding=False) > model.n_params()


def test_loss_ignores_padding():
    torch.manual_seed(0)
    model = ChemGPT(ChemGPTConfig(vocab_size=30, width=16, depth=1, n_heads=2))
    seq = torch.randint(4, 30, (2, 12))
    padded = torch.cat([seq, torch.full((2, 5), PAD_ID)], 1)
    _, loss = model(seq[:, :-1], seq[:, 1:])
    _, loss_padded = model(padded[:, :-1], padded[:, 1:])
    torch.testing.assert_close(loss, loss_padded)


def test_local_window_limits_attention():
    torch.manual_seed(0)
    model = ChemGPT(ChemGPTConfig(vocab_size=30, width=16, depth=1, n_heads=2, window_size=4,
                                  attention_layers="local", n_positions=32)).eval()
    x = torch.randint(4, 30, (1, 20))
    y = x.clone()
    y[0, 2] = (x[0, 2] + 1 - 4) % 26 + 4  # a token far outside the window of the last positions
    with torch.no_grad():
        a, b = model(x)[0], model(y)[0]
    torch.testing.assert_close(a[0, 10:], b[0, 10:])  # out of reach of position 2
    assert not torch.allclose(a[0, 2:6], b[0, 2:6])  # inside the window: changed


def test_optimizer_decays_only_matrices():
    model = ChemGPT(ChemGPTConfig(vocab_size=30, width=16, depth=2, n_heads=2))
    opt = model.configure_optimizer(lr=1e-3, weight_decay=0.1)
    decayed, plain = opt.param_groups
    assert all(p.dim() >= 2 for p in decayed["params"]) and all(p.dim() < 2 for p in plain["params"])
    assert plain["weight_decay"] == 0.0
    assert len(decayed["params"]) + len(plain["params"]) == len(list(model.parameters()))


def test_preset_heads_divide_width():
    for width in (16, 32, 48, 64, 128, 256, 512, 2048):
        assert width % preset_heads(width) == 0


def test_training_loss_and_gradients_match_hf():
    """The training path (CPU attention for narrow heads, the sigmoid-form GELU, padding masked)."""
    from chemscale.lm.chemgpt import _to_hf_state

    hf = _random_hf().train()  # dropout probabilities are 0
    model = ChemGPT.from_hf(hf).train()
    batch = torch.randint(4, 40, (3, 30))
    batch[0, 20:] = PAD_ID
    _, loss = model(batch[:, :-1], batch[:, 1:])
    loss.backward()
    theirs = hf(batch, labels=batch.masked_fill(batch == PAD_ID, -100))
    theirs.loss.backward()
    torch.testing.assert_close(loss, theirs.loss, atol=1e-5, rtol=1e-5)
    ours = _to_hf_state({name: p.grad for name, p in model.named_parameters()}, model.config)
    for name, p in hf.named_parameters():
        torch.testing.assert_close(ours[name], p.grad, atol=1e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")


def test_bf16_autocast_loss_and_gradients_match_fp32():
    """Under bf16 autocast the narrow-head CPU attention pads keys to a multiple of 32 (30 -> 32 here):
    the loss and the gradients stay those of fp32 to bf16 rounding."""
    torch.manual_seed(0)
    model = ChemGPT(ChemGPTConfig(vocab_size=40, width=64, depth=2, n_heads=4)).train()
    batch = torch.randint(4, 40, (4, 31))
    batch[0, 20:] = PAD_ID
    grads = {}
    for bf16 in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            _, loss = model(batch[:, :-1], batch[:, 1:])
        loss.backward()
        grads[bf16] = loss.detach(), {name: p.grad for name, p in model.named_parameters()}
        model.zero_grad(set_to_none=True)
    (loss32, grad32), (loss16, grad16) = grads[False], grads[True]
    torch.testing.assert_close(loss16, loss32, atol=0, rtol=1e-2)
    for name, g in grad32.items():
        assert torch.linalg.vector_norm(grad16[name] - g) <= 0.05 * torch.linalg.vector_norm(g), name


def test_tanh_gelu_matches_torch_and_gradcheck():
    from chemscale.lm.chemgpt import TanhGELU

    x = torch.randn(1000) * 4
    torch.testing.assert_close(TanhGELU.apply(x), torch.nn.functional.gelu(x, approximate="tanh"))
    assert torch.autograd.gradcheck(TanhGELU.apply, (torch.randn(64, dtype=torch.double, requires_grad=True),))


def test_a_run_configs_model_section_is_the_models_shape():
    """The `model` section is ChemGPTShape: the keys, defaults and order of before, so run ids stay; checked in
    one place. The ids below change with any run-config key added or default changed (last: the data
    section's n_test_molecules, issue 10), never with the model section's shape."""
    from conftest import tiny_lm_config

    from chemscale import run_config, runs
    from chemscale.config import ConfigError
    from chemscale.lm.chemgpt import ChemGPTShape

    assert runs.run_id(tiny_lm_config()) == "56cc4facfd94"
    assert runs.run_id({"task": "chemgpt"}) == "553b20b635f2"
    assert list(run_config.complete_config({"task": "chemgpt"})["model"].items()) == [
        ("width", 64), ("depth", 2), ("n_heads", 0), ("n_positions", 128), ("attention_layers", "global"),
        ("window_size", 256), ("dropout", 0.0)]
    with pytest.raises(ConfigError, match="key 'n_heads' must divide width 64, got 5"):
        ChemGPTShape(n_heads=5)  # refused with the config, not when the model is built
    with pytest.raises(ConfigError, match="key 'dropout'"):
        ChemGPTConfig(vocab_size=30, dropout=1.0)
    assert ChemGPTConfig(vocab_size=30, width=512).n_heads == preset_heads(512) == 16


# --- the held-out test split and result.json's test_loss ---------------------------------------------

def _direct_test_loss(run_dir, n_test: int) -> float:
    """best.pt's loss on the test split, one molecule at a time: nats per target token, [EOS] included."""
    from chemscale.lm import corpus
    from chemscale.lm.best import load_best_model

    model, tokenizer = load_best_model(run_dir)
    test = corpus.load("moses", "test", n_test, tokenizer=tokenizer, progress=False)
    total = count = 0.0
    with torch.no_grad():
        for i in range(len(test)):
            ids = torch.tensor([[BOS_ID, *test[i].tolist(), EOS_ID]])
            _, loss = model(ids[:, :-1], ids[:, 1:])
            total, count = total + float(loss) * (ids.shape[1] - 1), count + ids.shape[1] - 1
    return total / count


def test_result_has_the_best_models_loss_on_the_test_split_and_a_resume_writes_the_same(runs_root):
    import math

    from conftest import tiny_lm_config

    from chemscale import runs, train

    config = tiny_lm_config()
    config["data"]["n_test_molecules"] = 300
    run = runs.create("t", config, runs_root)
    result = train.train(run)
    assert result["n_test_molecules"] == result["n_test_molecules_asked"] == 300  # n_positions 128: all fit
    assert math.isfinite(result["test_loss"]) and result["test_loss"] != result["best_val_loss"]
    assert result["test_loss"] == pytest.approx(_direct_test_loss(run, 300), rel=1e-5)
    (run / runs.RESULT).unlink()  # resumed from its last checkpoint: best.pt decides, not the process
    again = train.train(run)
    assert again["resumed_from_step"] == result["steps"] and again["test_loss"] == result["test_loss"]


def test_the_test_set_is_the_same_for_every_run_of_a_source_and_shares_nothing_with_train_or_val(tmp_path):
    """Its molecules depend on the source and n_test_molecules only, never on the run's n_train or n_val."""
    from conftest import tiny_lm_config

    from chemscale.lm import task as lm_task
    from chemscale.run_config import TrainConfig

    def splits(n_train, n_val, folder):
        config = tiny_lm_config()
        config["data"].update(n_train_molecules=n_train, n_val_molecules=n_val, n_test_molecules=200)
        task = lm_task.build(config, TrainConfig(**config["train"]), tmp_path / folder, "t")
        loaders = (task.train_loader, task.val_loader, task.test_loader)
        return [{d.corpus.smiles()[i] for i in d.index} for d in (loader.dataset for loader in loaders)]

    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    train_a, val_a, test_a = splits(100, 50, "a")
    train_b, val_b, test_b = splits(300, 400, "b")
    assert test_a == test_b and len(test_a) == 200
    for train_set, val_set, test_set in ((train_a, val_a, test_a), (train_b, val_b, test_b)):
        assert not (train_set & val_set or train_set & test_set or val_set & test_set)  # MOSES SMILES are canonical


def test_more_test_molecules_than_the_split_holds_is_a_config_error(tmp_path):
    from conftest import tiny_lm_config

    from chemscale.config import ConfigError
    from chemscale.lm import task as lm_task

    config = tiny_lm_config()
    config["data"]["n_test_molecules"] = 10_001
    with pytest.raises(ConfigError, match=r"n_test_molecules = 10,001, but the test split of 'moses' leaves 10,000 "
                                          r"molecules that encode; ask for at most 10,000"):
        lm_task.validate(config, "t", data=True)
    fixture = tmp_path / "mols.smi"  # 200 lines: a test split of 20
    fixture.write_bytes((Path(__file__).parent / "fixtures" / "moses_200.smi").read_bytes())
    config["data"].update(source=str(fixture), n_train_molecules=100, n_val_molecules=20, n_test_molecules=21)
    with pytest.raises(ConfigError, match=r"n_test_molecules = 21, but the test split of '.*mols.smi' leaves 20"):
        lm_task.validate(config, "t", data=True)
    config["data"]["n_test_molecules"] = 20
    lm_task.validate(config, "t", data=True)
    with pytest.raises(ConfigError, match="key 'n_test_molecules'"):
        lm_task.LMDataConfig(n_test_molecules=0)


# --- train.compile: torch.compile of the transformer blocks ------------------------------------------

def test_a_compiled_run_trains_as_the_eager_one_and_saves_the_same_keys(runs_root):
    """train.compile through the runner, with "aot_eager" (dynamo tracing and AOT autograd, no code generated:
    seconds; inductor, the backend to use, takes minutes to compile here): the same losses to float rounding,
    and best.pt under the parameter names of an eager run, so checkpoints and export read it as one."""
    import csv

    from conftest import tiny_lm_config

    from chemscale import runs, train
    from chemscale.task import BEST

    def run(**compile):
        config = tiny_lm_config(max_steps=6, val_every_steps=3, **compile)
        config["model"].update(depth=2, attention_layers="global_local")  # both kinds of block are compiled
        run_dir = runs.create("t", config, runs_root)
        result = train.train(run_dir)
        with open(run_dir / runs.METRICS) as f:
            rows = list(csv.DictReader(f))
        return result, rows, torch.load(run_dir / BEST, weights_only=True)

    eager, compiled = run(), run(compile="aot_eager")
    for key in ("best_val_loss", "test_loss"):
        assert compiled[0][key] == pytest.approx(eager[0][key], rel=1e-5), key
    losses = [[float(r["train_loss"] or r["val_loss"]) for r in rows] for rows in (eager[1], compiled[1])]
    assert len(losses[0]) >= 6 and losses[1] == pytest.approx(losses[0], rel=1e-5)
    assert list(compiled[2]) == list(eager[2])


def test_compile_off_leaves_run_ids_alone_and_an_unknown_backend_is_refused():
    from conftest import tiny_lm_config

    from chemscale import run_config, runs
    from chemscale.config import ConfigError

    off = {"task": "chemgpt", "train": {"compile": ""}}
    assert runs.run_id(off) == runs.run_id({"task": "chemgpt"}) == "553b20b635f2"  # the pinned id above
    assert "compile" not in run_config.complete_config(off)["train"]  # nor in config.json
    on = tiny_lm_config(compile="inductor")
    assert run_config.complete_config(on)["train"]["compile"] == "inductor"
    assert runs.run_id(on) != runs.run_id(tiny_lm_config())
    with pytest.raises(ConfigError, match=r"\[train\]: key 'compile' is not a torch.compile backend: 'inducter'.*"
                                          r"'inductor'"):
        runs.run_id(tiny_lm_config(compile="inducter"))
