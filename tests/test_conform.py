"""Plug-ins as users have them (`--optimizer-kwargs`, constructors without momentum) and the
`harness conform` certificate: the diagnosed update rule plus, per claim family, holds / does not
hold / not applicable, on the project's own optimizers and on real third-party ones."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from harness import conform
from harness.cli import EXIT_BAD_INPUT, EXIT_FAIL, EXIT_OK, main

PLUGINS = Path(__file__).resolve().parent / "plugins"
FAST = "wdexp-thm2.1-mlp-bn"  # no momentum
ZEROBUF = "wdexp-zerobuf-mlp-bn"  # momentum 0.9

SEEN: list[dict] = []


def recording_sgd(params, **kw):
    """torch SGD that remembers the keywords it was built with."""
    SEEN.append(dict(kw))
    return torch.optim.SGD(params, **kw)


def run_cli(capsys, *argv):
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as exc:
        rc = exc.code
    out, err = capsys.readouterr()
    return rc, out, err


# ---- --optimizer-kwargs and momentum-free constructors ------------------------------------------

def test_optimizer_kwargs_reach_the_constructor_on_top_of_the_cases_own(capsys, tmp_path):
    SEEN.clear()
    rc, out, _ = run_cli(capsys, "run", ZEROBUF, "--seeds", "0", "--optimizer", f"{__name__}:recording_sgd",
                         "--optimizer-kwargs", '{"foreach": true, "dampening": 0}', "--out", tmp_path / "r")
    assert rc == EXIT_OK, out
    case_calls = SEEN[1:]  # the first is the construction check
    assert case_calls and all(kw["foreach"] is True and kw["dampening"] == 0 and kw["momentum"] == 0.9
                              for kw in case_calls)
    meta = json.loads((tmp_path / "r" / "metadata.json").read_text())
    assert meta["optimizer_kwargs"] == {"foreach": True, "dampening": 0}


def test_optimizer_kwargs_change_the_verdict():
    """The kwargs are really used: Nesterov momentum breaks the exact WD ≡ exp-LR case."""
    from harness import registry
    from harness.runner import RunEnv
    from harness.session import execute
    outcome = execute(registry.get(ZEROBUF), RunEnv(seeds=(0,), optimizer_kwargs='{"nesterov": true}'))
    assert outcome.status == "fail" and "function_gap" in outcome.message


@pytest.mark.parametrize("text, why", [
    ('{"lr": 1}', "must not set lr"),
    ('[1, 2]', "must be a JSON object, got list"),
    ('{foreach: true}', "must be a JSON object"),
    ('{"no_such_keyword": 1}', 'and --optimizer-kwargs {"no_such_keyword": 1}'),
])
def test_bad_optimizer_kwargs_are_one_line_exit_2(text, why, capsys, tmp_path):
    rc, out, err = run_cli(capsys, "run", FAST, "--optimizer-kwargs", text, "--out", tmp_path / "r")
    assert rc == EXIT_BAD_INPUT and out == ""
    assert len(err.strip().splitlines()) == 1 and why in err
    assert not (tmp_path / "r").exists()


def test_an_optimizer_without_momentum_runs_the_momentum_free_cases_and_skips_the_rest(monkeypatch, capsys, tmp_path):
    monkeypatch.syspath_prepend(str(PLUGINS))
    rc, out, _ = run_cli(capsys, "run", FAST, ZEROBUF, "--seeds", "0", "--optimizer",
                         "buggy_optimizers:sgd_without_momentum", "--out", tmp_path / "r")
    assert rc == EXIT_OK
    assert re.search(rf"^OK\s+{FAST}\b", out, re.M)
    assert re.search(rf"^SKIPPED\s+{ZEROBUF}\s.*takes no momentum, and arm 'wd' uses momentum 0.9", out, re.M)
    assert "1 ok, 0 fail, 0 error, 1 skipped" in out


# ---- harness conform ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sgd_certificate(tmp_path_factory):
    """torch SGD through the real command, once: its JSON certificate, run directory and report."""
    out = tmp_path_factory.mktemp("conform")
    import contextlib
    import io
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(io.StringIO()):
        rc = main(["conform", "--json", "--out", str(out / "run"), "--html", str(out / "c.html")])
    return rc, json.loads(buf.getvalue()), out


def test_torch_sgd_conforms_and_every_quick_family_holds(sgd_certificate):
    rc, cert, out = sgd_certificate
    assert rc == EXIT_OK and cert["conforms"] and cert["diagnosis"]["form"] == "def12"
    status = {f["family"]: f["status"] for f in cert["families"]}
    assert status == {"wd-exp-lr": "holds", "texp": "holds", "intrinsic-reparam": "holds", "smd": "holds",
                      "ilr-equilibrium": "not run", "toy": "holds"}
    wd = next(f for f in cert["families"] if f["family"] == "wd-exp-lr")
    assert wd["worst"]["ratio"] < 1e-2  # roundoff against 1e-9
    page = (out / "c.html").read_text()
    assert "<h2>Certificate</h2>" in page and "conforms to Definition 1.2" in page
    meta = json.loads((out / "run" / "metadata.json").read_text())
    assert meta["certificate"]["conforms"] is True


def test_third_party_decoupled_wd_is_diagnosed_and_explains_the_failing_family(capsys, tmp_path):
    pytest.importorskip("timm")
    rc, out, _ = run_cli(capsys, "conform", "--optimizer", "timm.optim:SGDW", "--html", tmp_path / "c.html")
    assert rc == EXIT_FAIL
    assert "decoupled" in out.lower() and "Thm 2.9" in out
    assert re.search(r"^WD ≡ exp-LR .*does not hold", out, re.M)
    assert re.search(r"^intrinsic-LR reparametrization .*holds", out, re.M)  # scale invariance survives
    assert "Conforms to Definition 1.2 (torch SGD, coupled WD, dampening 0): NO" in out
    assert len(out.splitlines()) <= 40  # one screen
    page = (tmp_path / "c.html").read_text()
    assert "<h2>Certificate</h2>" in page and "does NOT conform" in page


def test_trust_ratio_certificate():
    pytest.importorskip("timm")
    cert, _ = conform.certify("timm.optim:Lars")
    assert cert["diagnosis"]["form"] == "trust_ratio" and not cert["conforms"]
    status = {f["family"]: f["status"] for f in cert["families"]}
    assert status["wd-exp-lr"] == "does not hold"


def test_conform_bad_input_is_one_line_exit_2(capsys):
    rc, out, err = run_cli(capsys, "conform", "--optimizer", "torch.optim:NoSuchThing")
    assert rc == EXIT_BAD_INPUT and out == "" and len(err.strip().splitlines()) == 1
    rc, out, err = run_cli(capsys, "conform", "--optimizer-kwargs", '{"momentum": 0}')
    assert rc == EXIT_BAD_INPUT and "must not set momentum" in err


def test_family_judgement_is_not_applicable_when_every_case_skips():
    from harness import registry
    from harness.session import Outcome
    import pandas as pd
    case = registry.get(ZEROBUF)
    skipped = Outcome(case, pd.DataFrame(), pd.DataFrame(), "skipped", "takes no momentum")
    fam = conform.judge_family(conform.FAMILIES[0], [skipped])
    assert fam["status"] == "not applicable" and fam["why"] == "takes no momentum" and fam["worst"] is None
