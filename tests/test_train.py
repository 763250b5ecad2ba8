"""Training the memory heads end to end on the tiny base: projects -> memories and cached inputs ->
steps -> checkpoint -> resume -> weights; and the command line's refusals."""

import json
import random
import re
import subprocess
import sys

import pytest
import torch

from mtlsp_model.cli import main as cli
from mtlsp_model.train import TrainConfig, distill_loss, projects_of
from mtlsp_model.corpus import build_documents
from mtlsp_model.weights import load_weights, save_weights

pytestmark = pytest.mark.slow  # training runs, end to end

WORDS = ["ledger", "invoice", "tally", "quarter", "harvest", "stitch", "render", "parcel", "beacon", "ripple"]


def write_package(root, name: str, seed: int) -> None:
    """A package whose modules call functions defined in its other modules."""
    rng = random.Random(seed)
    pkg = root / name
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    defined = []
    for m in range(4):
        lines = [f'"""Module {m} of {name}."""\n']
        for _ in range(6):
            fn = "_".join(rng.sample(WORDS, 3))
            defined.append((m, fn))
            lines.append(f"\ndef {fn}(items, scale=2):\n    total = 0\n    for item in items:\n"
                         f"        total += item * scale\n    return total\n")
        (pkg / f"mod{m}.py").write_text("".join(lines))
    for u in range(3):
        calls = [f"from . import mod{m}\n" for m in range(4)]
        for _ in range(12):
            m, fn = rng.choice(defined)
            calls.append(f"\n\ndef use_{u}_{fn}(rows):\n    value = mod{m}.{fn}(rows)\n    return value + mod{m}.{fn}(rows, 3)\n")
        (pkg / f"user{u}.py").write_text("".join(calls))


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    root = tmp_path_factory.mktemp("site")
    for i, name in enumerate(["alphapkg", "betapkg", "gammapkg", "flask"]):
        write_package(root, name, i)
    return root


def test_projects_split_big_documents_and_keep_small_ones(site, tok):
    docs, skipped = build_documents([site])
    assert skipped == ["flask"]  # the development set stays out of training
    cfg = TrainConfig(project_min_tokens=100, project_max_tokens=100_000)
    projects = projects_of(docs[0], tok, cfg)
    assert len(projects) == 1 and len(projects[0]) == 7  # the empty __init__.py is no source
    small = TrainConfig(project_min_tokens=100, project_max_tokens=400)
    assert all(sum(len(t) // 3 for _, t in p) <= 400 for p in projects_of(docs[0], tok, small))


def run_train(tiny_weights, site, out, steps):
    cli(["train", "--weights", str(tiny_weights), "--out", str(out), "--root", str(site), "--examples", "24",
         "--steps", str(steps), "--window", "64", "--accumulate", "2", "--lr", "0.01", "--project-min-tokens", "100",
         "--ckpt-every", "2"])


def test_train_then_resume_then_load(tiny_weights, site, tmp_path):
    run = tmp_path / "run"
    run_train(tiny_weights, site, run, 4)
    manifest = json.loads((run / "corpus_manifest.json").read_text())
    assert {d["name"] for d in manifest["documents"]} == {"alphapkg", "betapkg", "gammapkg"}
    assert manifest["excluded"] == ["flask"]
    loaded = load_weights(run / "weights")
    before = load_weights(tiny_weights)
    assert loaded.trained
    assert not torch.equal(loaded.model.memory.up, before.model.memory.up)  # the adapters moved
    history = json.loads((run / "weights" / "config.json").read_text())["training"]["history"]
    assert history[-1]["step"] == 4 and history[0]["step"] == 0

    run_train(tiny_weights, site, run, 6)  # the same command with more steps resumes
    history = json.loads((run / "weights" / "config.json").read_text())["training"]["history"]
    assert [h["step"] for h in history] == [0, 2, 4, 6]
    assert json.loads((run / "weights" / "corpus_manifest.json").read_text()) == manifest


def test_cross_file_identifier_tokens_are_marked_and_can_weigh_more(tiny_weights, site, tmp_path, tok):
    """``--cross-weight``: the examples record where names defined in their project's other
    files occur, the held-out loss is reported on those tokens, and the loss weighs them."""
    run = tmp_path / "run"
    cli(["train", "--weights", str(tiny_weights), "--out", str(run), "--root", str(site), "--examples", "24",
         "--steps", "2", "--window", "64", "--accumulate", "2", "--lr", "0.01", "--project-min-tokens", "100",
         "--ckpt-every", "2", "--cross-weight", "4"])
    rows = json.loads((run / "examples.json").read_text())["examples"]
    assert all(r["cross"] == len(r["cross_at"]) for r in rows) and sum(r["cross"] for r in rows)
    # each run of marked tokens spells one function defined in another module (three of WORDS),
    # unless the window cuts it
    name = re.compile("(?:{0})(?:_(?:{0})){{2}}".format("|".join(WORDS)))
    for r in rows:
        window, spans = r["ids"][r["first"] :], []
        for j in r["cross_at"]:
            if spans and spans[-1][1] == j - 1:
                spans[-1][1] = j
            else:
                spans.append([j, j])
        for a, b in spans:
            if a > 0 and b < len(window) - 1:
                text = tok.decode(window[a : b + 1])
                assert name.fullmatch(text.strip(" .(")), text
    training = json.loads((run / "weights" / "config.json").read_text())["training"]
    assert training["config"]["cross_weight"] == 4
    assert all(h["nll_cross"] > 0 for h in training["history"])

    # caches prepared before examples recorded cross_at cannot weigh anything: said, not ignored
    meta = json.loads((run / "examples.json").read_text())
    for r in meta["examples"]:
        del r["cross_at"]
    (run / "examples.json").write_text(json.dumps(meta))
    with pytest.raises(SystemExit, match="--cross-weight needs a new run folder"):
        cli(["train", "--weights", str(tiny_weights), "--out", str(run), "--root", str(site), "--steps", "2",
             "--cross-weight", "4"])

    logp = torch.log_softmax(torch.tensor([[2.0, 0.0], [0.0, 2.0], [1.0, 1.0]]), -1)
    ids = torch.tensor([0, 0, 1])
    token_nll = -logp[torch.arange(3), ids]
    _, _, plain = distill_loss(logp, None, ids, 0.0, 1.0)
    weighted, _, reported = distill_loss(logp, None, ids, 0.0, 1.0, torch.tensor([1.0, 4.0, 1.0]))
    assert torch.allclose(plain, token_nll.mean()) and torch.allclose(reported, plain)  # the plain mean is reported
    assert torch.allclose(weighted, (token_nll * torch.tensor([1.0, 4.0, 1.0])).sum() / 6)


def test_eval_refuses_a_trained_on_repository(tiny_weights, site, tmp_path):
    run = tmp_path / "run"
    run_train(tiny_weights, site, run, 2)
    repo = tmp_path / "checkouts" / "alphapkg"
    (repo / "alphapkg").mkdir(parents=True)
    (repo / "alphapkg" / "__init__.py").write_text("x = 1\n")
    with pytest.raises(SystemExit, match="refusing to evaluate"):
        cli(["eval", "--weights", str(run / "weights"), "--repo", str(repo)])


def test_eval_reports_memory_against_none_and_control(tiny_weights, site, tmp_path):
    """Leave-one-file-out bits with the memory, without, with an unrelated memory, and stuffed."""
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps({"documents": []}))
    out = tmp_path / "eval.json"
    cli(["eval", "--weights", str(tiny_weights), "--manifest", str(manifest), "--repo", str(site / "alphapkg"),
         "--control", str(site / "betapkg"), "--json", str(out)])
    r = json.loads(out.read_text())["repositories"][0]
    assert r["files"] == 7 and r["cross_tokens"] > 0
    assert set(r["all"]["bits_per_token"]) == {"none", "memory", "control", "stuffed"}
    assert all(v > 0 for v in r["cross"]["bits_per_token"].values())

    # two weights compare on a subset of the conditions, with the same figures
    cli(["eval", "--weights", str(tiny_weights), "--manifest", str(manifest), "--repo", str(site / "alphapkg"),
         "--control", str(site / "betapkg"), "--conditions", "none,memory", "--json", str(out)])
    quick = json.loads(out.read_text())["repositories"][0]
    assert quick["all"]["bits_per_token"] == {c: r["all"]["bits_per_token"][c] for c in ("none", "memory")}
    with pytest.raises(SystemExit, match="unknown condition memroy"):
        cli(["eval", "--weights", str(tiny_weights), "--repo", str(site / "alphapkg"), "--conditions", "memroy"])


def test_cli_reports_bad_weights_without_a_traceback(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    proc = subprocess.run([sys.executable, "-m", "mtlsp_model", "heads", "--weights", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert "config.json is not valid JSON" in proc.stderr and "Traceback" not in proc.stderr


def warm_start(trained, tiny_base, site, tmp_path, *change: str):
    """Save ``trained`` as weights, then a one-step run at learning rate 0 that changes them by
    ``change`` with ``--warm-start``: what the run starts from, untouched by training."""
    weights = save_weights(trained, tmp_path / "trained", base={"fingerprint": tiny_base.name, "path": str(tiny_base)})
    run = tmp_path / "run"
    cli(["train", "--weights", str(weights), "--out", str(run), "--root", str(site), "--examples", "8",
         "--steps", "1", "--window", "64", "--accumulate", "1", "--lr", "0", "--project-min-tokens", "100",
         *change, "--warm-start"])
    return weights, run


def test_warm_start_adds_heads_and_keeps_the_trained_ones(tiny_base, tiny_weights, site, tmp_path):
    """``--heads ... --warm-start``: the heads the weights have keep their parameters, a new head
    on the same key/value head starts fresh, and the config records what the run started from."""
    trained = load_weights(tiny_weights).model
    with torch.no_grad():  # parameters no fresh head could have by chance
        trained.memory.bias.copy_(torch.tensor([0.5, 1.5, 2.5]))
        trained.memory.up.normal_()
        trained.memory.copy_gate.fill_(0.25)
    weights, run = warm_start(trained, tiny_base, site, tmp_path, "--heads", "L1H0,L1H1,L2H2,L2H3")
    before, after = load_weights(weights), load_weights(run / "weights")
    assert after.config.memory_heads == ((1, 0), (1, 1), (2, 2), (2, 3))
    assert after.config.memory_kv_heads == before.config.memory_kv_heads  # no new storage
    old, new = before.model.memory, after.model.memory
    for i_new, i_old in ((0, 0), (1, 1), (3, 2)):
        assert torch.equal(new.down[i_new], old.down[i_old]) and torch.equal(new.up[i_new], old.up[i_old])
        assert new.bias[i_new] == old.bias[i_old]
    assert torch.count_nonzero(new.up[2]) == 0 and new.bias[2] == after.config.mem_bias_init  # fresh
    assert new.copy_gate == old.copy_gate
    info = json.loads((run / "weights" / "config.json").read_text())["training"]
    assert info["warm_start"]["heads"] == [[1, 0], [1, 1], [2, 3]]


@pytest.mark.parametrize("change", [("--adapter-rank", "5"), ("--value-rank", "3", "--copy-context")])
def test_warm_start_with_more_parameters_computes_the_same_until_trained(tiny_base, tiny_weights, site,
                                                                        tmp_path, tok, change):
    """``--adapter-rank R`` / ``--value-rank R --copy-context`` with ``--warm-start``: the trained
    adapter fills the first components and every new part starts as no change, so the model
    reads its memory exactly as before training."""
    trained = load_weights(tiny_weights).model
    with torch.no_grad():
        trained.memory.up.normal_()  # an adapter that changes the queries
        trained.memory.copy_gate.fill_(1.0)  # a copy that matters
    weights, run = warm_start(trained, tiny_base, site, tmp_path, *change)
    before, after = load_weights(weights), load_weights(run / "weights")
    assert after.config.memory_heads == before.config.memory_heads
    if "--adapter-rank" in change:
        assert (before.config.adapter_rank, after.config.adapter_rank) == (2, 5)
        assert torch.equal(after.model.memory.down[:, :, :2], before.model.memory.down)
        assert torch.count_nonzero(after.model.memory.up[:, 2:]) == 0
    else:
        assert (after.config.value_rank, after.config.copy_context) == (3, True)
        assert torch.equal(after.model.memory.up, before.model.memory.up)
        assert after.model.memory.value_up.shape == (3, 3, 8) and after.model.memory.copy_proj.shape == (32,)

    from mtlsp_model.memory import TensorMemory
    from mtlsp_model.projects import encode_memory, tokenize_files

    files = tokenize_files(tok, [(p.name, p.read_text()) for p in sorted((site / "alphapkg").glob("mod*.py"))])
    mem = encode_memory(before.model, tok, files)
    memory = TensorMemory(mem.keys, mem.values, mem.tokens, mem.files)
    ids = torch.tensor([tok.encode((site / "alphapkg" / "user0.py").read_text())[:120]])
    with torch.no_grad():
        a = before.model(ids, memory=memory).logits
        b = after.model(ids, memory=memory).logits
    assert torch.allclose(a, b, atol=1e-5)
