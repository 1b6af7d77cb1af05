"""The HTML report in a real headless browser (Debian's chromium, driven over the DevTools
protocol through --remote-debugging-pipe: stdlib only, no driver, no browser download).

Asserts: the page loads with no console errors or failed loads, every plot renders (naturalWidth > 0),
and the verdict tables have one row per verdict. A planted broken page proves the checks can fail.
Skipped when chromium is missing, except under CI=true, where a missing browser fails the test
(.ci/run installs it).

Screenshot of any report: `.venv/bin/python tests/test_browser.py REPORT.html OUT.png`.
"""
from __future__ import annotations

import json
import math
import os
import select
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from harness import report, store  # noqa: E402

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-extensions", "--disable-default-apps", "--no-default-browser-check",
         "--mute-audio", "--hide-scrollbars", "--remote-debugging-pipe"]


def find_chromium() -> str | None:
    for name in (os.environ.get("CHROMIUM"), "chromium", "chromium-browser", "google-chrome"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


class CDPError(RuntimeError):
    pass


class Chromium:
    """A headless chromium spoken to over the DevTools pipe (fd 3: commands in, fd 4: replies out;
    each message is JSON followed by a NUL byte)."""

    def __init__(self, binary: str, width: int = 1400, height: int = 900, timeout: float = 60):
        self.timeout, self.width, self.height = timeout, width, height
        self.profile = tempfile.mkdtemp(prefix="lrc-chromium-")
        to_child_r, self._to_child = os.pipe()
        self._from_child, from_child_w = os.pipe()
        # The child's ends move above fd 10 first, so that dup2 onto 3 and 4 cannot clobber them.
        to_child_r, from_child_w = (self._high(fd) for fd in (to_child_r, from_child_w))

        def fds():  # in the child: the pipe ends become fds 3 and 4
            os.dup2(to_child_r, 3)
            os.dup2(from_child_w, 4)

        self.proc = subprocess.Popen(
            [binary, *FLAGS, f"--user-data-dir={self.profile}", f"--window-size={width},{height}",
             "about:blank"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            preexec_fn=fds, close_fds=False)  # close_fds would run after fds() and close 3 and 4
        os.close(to_child_r)
        os.close(from_child_w)
        self._buf, self._id, self.events = b"", 0, []
        self.session = None

    @staticmethod
    def _high(fd: int) -> int:
        import fcntl
        high = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10)
        os.close(fd)
        return high

    def __enter__(self):
        target = self.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        self.session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page", "Runtime", "Log"):
            self.call(f"{domain}.enable", session=True)
        self.call("Emulation.setDeviceMetricsOverride",
                  {"width": self.width, "height": self.height, "deviceScaleFactor": 1, "mobile": False},
                  session=True)
        return self

    def __exit__(self, *exc):
        try:
            self.call("Browser.close", timeout=10)
        except Exception:
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for fd in (self._to_child, self._from_child):
            try:
                os.close(fd)
            except OSError:
                pass
        if self.proc.stderr:
            self.proc.stderr.close()
        shutil.rmtree(self.profile, ignore_errors=True)

    def _read(self, deadline: float) -> dict:
        while b"\0" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise CDPError("timed out waiting for chromium")
            ready, _, _ = select.select([self._from_child], [], [], left)
            if ready:
                chunk = os.read(self._from_child, 1 << 20)
                if not chunk:
                    err = self.proc.stderr.read().decode(errors="replace")[-2000:] if self.proc.stderr else ""
                    raise CDPError(f"chromium closed the DevTools pipe (exit {self.proc.poll()}): {err}")
                self._buf += chunk
        msg, self._buf = self._buf.split(b"\0", 1)
        return json.loads(msg)

    def call(self, method: str, params: dict | None = None, session: bool = False, timeout: float | None = None):
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = self.session
        os.write(self._to_child, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + (timeout or self.timeout)
        while True:
            reply = self._read(deadline)
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise CDPError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def wait_event(self, method: str, timeout: float | None = None) -> dict:
        deadline = time.monotonic() + (timeout or self.timeout)
        for i, ev in enumerate(self.events):
            if ev.get("method") == method:
                return self.events.pop(i)
        while True:
            ev = self._read(deadline)
            if ev.get("method") == method:
                return ev
            self.events.append(ev)

    def open(self, url: str) -> None:
        self.events = []
        self.call("Page.navigate", {"url": url}, session=True)
        self.wait_event("Page.loadEventFired")

    def evaluate(self, expression: str):
        res = self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True}, session=True)
        if "exceptionDetails" in res:
            raise CDPError(f"evaluate failed: {res['exceptionDetails']}")
        return res["result"].get("value")

    def problems(self) -> list[str]:
        """Console errors, uncaught exceptions and failed loads seen since open()."""
        # Drain what has arrived without waiting.
        while True:
            ready, _, _ = select.select([self._from_child], [], [], 0.2)
            if not ready and b"\0" not in self._buf:
                break
            self.events.append(self._read(time.monotonic() + 5))
        out = []
        for ev in self.events:
            method, params = ev.get("method"), ev.get("params", {})
            if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
                out.append("console." + params["type"] + ": " + json.dumps(params.get("args"))[:300])
            elif method == "Runtime.exceptionThrown":
                out.append("exception: " + json.dumps(params.get("exceptionDetails"))[:300])
            elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
                e = params["entry"]
                out.append(f"log {e.get('source')}: {e.get('text')} {e.get('url', '')}")
        return out

    def screenshot(self, path: Path) -> None:
        height = int(self.evaluate("document.documentElement.scrollHeight"))
        self.call("Emulation.setDeviceMetricsOverride",
                  {"width": self.width, "height": min(height, 16000), "deviceScaleFactor": 1, "mobile": False},
                  session=True)
        import base64
        data = self.call("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True},
                         session=True)["data"]
        Path(path).write_bytes(base64.b64decode(data))


PAGE_FACTS = """JSON.stringify({
  images: Array.from(document.images).map(i => ({w: i.naturalWidth, h: i.naturalHeight, ok: i.complete,
                                                 alt: i.alt})),
  verdictRows: Array.from(document.querySelectorAll('table.verdicts tr')).filter(r => r.querySelector('td')).length,
  okRows: document.querySelectorAll('table.verdicts tr.ok').length,
  badRows: document.querySelectorAll('table.verdicts tr.bad').length,
  changes: Array.from(document.querySelectorAll('table.verdicts tr[data-change]')).map(r => r.dataset.change),
  title: document.title,
  bodyText: document.body.innerText.length
})"""


@pytest.fixture(scope="module")
def chromium():
    binary = find_chromium()
    if binary is None:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail("CI=true but chromium is missing: .ci/run installs it (apt-get install -y chromium)")
        pytest.skip("chromium not installed (apt-get install -y chromium); the browser test runs in CI")
    return binary


def synthetic_run(root: Path) -> tuple[Path, Path, pd.DataFrame]:
    """A run directory with gap, loss and accuracy curves, and a baseline that it regresses against."""
    from harness.checks import VERDICT_COLUMNS
    from harness.runner import RESULT_COLUMNS
    rows = []
    for arm, scale in (("exp", 1e-14), ("twin", 3e-13)):
        for seed in (0, 1):
            rows += [("case-a", arm, seed, s, "train_gap", scale * (1 + s / 50) * (1 + seed)) for s in range(1, 201)]
    rows += [("case-a", arm, 0, s, "loss", 2.0 / math.sqrt(s) + (arm == "exp") * 0.01)
             for arm in ("wd", "exp") for s in range(1, 201)]
    rows += [("case-b", arm, 0, 391 * e, "test_acc", 0.5 + 0.4 * (1 - math.exp(-e / 8)) - (arm == "exp") * 0.004)
             for arm in ("wd", "exp") for e in range(1, 31)]
    rows += [("case-c <b>", "exp", 0, s, "train_gap", 1e-3 * s) for s in range(1, 11)]
    results = pd.DataFrame(rows, columns=RESULT_COLUMNS)

    def v(case, prop, measured, tol, passed, negative=False, claim="claim-1"):
        return dict(case=case, claim=claim, property=prop, measured=measured, expected=f"max train_gap < {tol:.3g}",
                    tolerance=tol, passed=passed, negative=negative, ok=passed != negative,
                    source="a <measured> source", detail="")
    verdicts = pd.DataFrame([
        v("case-a", "function_gap", 6e-13, 1e-9, True),
        v("case-a", "si_norm_ratio", 5e-11, 1e-9, True),       # regressed vs 1e-13
        v("case-b", "final_test_acc_difference", 0.004, 0.03, True, claim="claim-2"),
        v("case-c <b>", "function_gap", 1e-2, 1e-9, False, negative=True),
        v("case-d", "function_gap", 2e-3, 1e-5, False, claim="claim-2"),  # flipped vs baseline
        v("case-e", "new_property", 1e-14, 1e-9, True, claim="claim-2"),  # new
    ], columns=VERDICT_COLUMNS)
    run = store.RunDir(root / "run")
    run.write_results(results)
    run.write_verdicts(verdicts)
    run.write_metadata({"created": "2026-01-01T00:00:00+00:00", "profile": "cpu", "device": "cpu",
                        "device_name": "cpu (x86_64, 2 cores, 2 torch threads)", "optimizer": "torch.optim:SGD",
                        "status": "finished", "versions": {"torch": "2.14.1"}, "seeds": {"case-a": [0, 1]},
                        "cases": {"case-a": {"status": "ok", "seconds": 1.0}}})
    base = pd.DataFrame([
        dict(case="case-a", property="function_gap", median=1e-13, min=5e-14, max=2e-13, n=3, tolerance=1e-9,
             passed=True, ok=True, negative=False),
        dict(case="case-a", property="si_norm_ratio", median=1e-13, min=8e-14, max=1.2e-13, n=3, tolerance=1e-9,
             passed=True, ok=True, negative=False),
        dict(case="case-b", property="final_test_acc_difference", median=0.005, min=0.002, max=0.007, n=3,
             tolerance=0.03, passed=True, ok=True, negative=False),
        dict(case="case-c <b>", property="function_gap", median=1e-2, min=9e-3, max=1.1e-2, n=3, tolerance=1e-9,
             passed=False, ok=True, negative=True),
        dict(case="case-d", property="function_gap", median=5e-7, min=4e-7, max=6e-7, n=3, tolerance=1e-5,
             passed=True, ok=True, negative=False),
        dict(case="case-gone", property="p", median=1.0, min=1.0, max=1.0, n=3, tolerance=2.0,
             passed=True, ok=True, negative=False),
    ])
    base_path = root / "base.csv"
    base.to_csv(base_path, index=False)
    return run.path, base_path, verdicts


def test_report_renders_in_chromium(chromium, tmp_path):
    run_dir, base_path, verdicts = synthetic_run(tmp_path)
    out = tmp_path / "report.html"
    comparison = report.write_report(run_dir, out, base_path)
    assert comparison.failed
    with Chromium(chromium) as browser:
        browser.open(out.as_uri())
        facts = json.loads(browser.evaluate(PAGE_FACTS))
        problems = browser.problems()
        shot = Path(os.environ.get("LRC_SCREENSHOT") or tmp_path / "report.png")
        browser.screenshot(shot)
    assert problems == [], problems
    assert facts["title"] == "lr-conformance report"
    # Plots: the margin charts (one per claim) and the per-case curves, all decoded and drawn.
    assert len(facts["images"]) >= 2 + 3, facts["images"]
    for img in facts["images"]:
        assert img["ok"] and img["w"] > 0 and img["h"] > 0, img
    assert any("test_acc vs epochs" in i["alt"] for i in facts["images"])
    assert facts["verdictRows"] == len(verdicts)
    assert facts["okRows"] == int(verdicts.ok.sum()) and facts["badRows"] == int((~verdicts.ok).sum())
    assert sorted(facts["changes"]) == sorted(["unchanged", "regressed", "unchanged", "unchanged",
                                               "flipped-bad", "new"])
    assert shot.stat().st_size > 10_000


BANNER_FACTS = """JSON.stringify({
  state: document.querySelector('.banner').dataset.state,
  scoreRows: Array.from(document.querySelectorAll('table.scoreboard tr.score')).map(r => r.dataset.claim),
  logYmins: Array.from(document.querySelectorAll('figure[data-log-ymin]')).map(f => parseFloat(f.dataset.logYmin)),
  openPlots: document.querySelectorAll('details.plots[open]').length
})"""


def test_banner_states_scoreboard_and_log_axes_in_chromium(chromium, tmp_path):
    """Green (all as intended), amber (a documented non-reproduction only), red (a planted baseline
    regression); one scoreboard row per claim; no log axis below float32's smallest normal although
    the gap curves hold exact zeros (bitwise-equal arms at step 0)."""
    from harness.checks import VERDICT_COLUMNS
    from harness.runner import RESULT_COLUMNS
    rows = [("case-a", arm, 0, s, "batch_gap", 0.0 if s < 3 else 1e-14 * s) for arm in ("exp", "twin")
            for s in range(0, 50)]
    results = pd.DataFrame(rows, columns=RESULT_COLUMNS)

    def v(case, claim, ok, measured=1e-13):
        return dict(case=case, claim=claim, property="function_gap", measured=measured, expected="max batch_gap < 1e-09",
                    tolerance=1e-9, passed=ok, negative=False, ok=ok, source="s", detail="")
    variants = {
        "green": ([v("case-a", "claim-1", True), v("case-b", "claim-2", True)], {"case-b": "ok"}, None),
        "amber": ([v("case-a", "claim-1", True), v("case-b", "claim-2", False)], {"case-b": "xfail"}, None),
        "red": ([v("case-a", "claim-1", True, 5e-11), v("case-b", "claim-2", True)], {"case-b": "ok"}, 1e-13),
    }
    with Chromium(chromium) as browser:
        for state, (vrows, statuses, base_median) in variants.items():
            run = store.RunDir(tmp_path / state)
            run.write_results(results)
            run.write_verdicts(pd.DataFrame(vrows, columns=VERDICT_COLUMNS))
            run.write_metadata({"created": "2026-01-01T00:00:00+00:00", "profile": "cpu", "device": "cpu",
                                "optimizer": "torch.optim:SGD", "status": "finished",
                                "cases": {"case-a": {"status": "ok"}, **{c: {"status": s} for c, s in statuses.items()}}})
            base = None
            if base_median is not None:  # case-a measured 5e-11 now, out of the safe margin: regressed
                base = tmp_path / "base.csv"
                pd.DataFrame([dict(case="case-a", property="function_gap", median=base_median, min=base_median,
                                   max=base_median, n=3, tolerance=1e-9, passed=True, ok=True, negative=False)]
                             ).to_csv(base, index=False)
            out = tmp_path / f"{state}.html"
            report.write_report(run.path, out, base)
            browser.open(out.as_uri())
            facts = json.loads(browser.evaluate(BANNER_FACTS))
            assert browser.problems() == []
            assert facts["state"] == state, facts
            assert sorted(facts["scoreRows"]) == ["claim-1", "claim-2"]
            assert facts["logYmins"] and min(facts["logYmins"]) >= 1.1754944e-38, facts
            assert facts["openPlots"] == (1 if state == "red" else 0)  # a regression opens its claim


def test_the_browser_check_catches_a_broken_page(chromium, tmp_path):
    """The checks above are not vacuous: a missing image and a script error are both reported."""
    page = tmp_path / "broken.html"
    page.write_text("<!DOCTYPE html><html><body><table class='verdicts'><tr><td>x</td></tr></table>"
                    "<img src='missing.png'><script>console.error('boom'); undefinedFn();</script></body></html>")
    with Chromium(chromium) as browser:
        browser.open(page.as_uri())
        facts = json.loads(browser.evaluate(PAGE_FACTS))
        problems = browser.problems()
    assert facts["images"][0]["w"] == 0
    assert any("boom" in p for p in problems), problems
    assert any(p.startswith("exception") for p in problems), problems
    assert any("missing.png" in p or "ERR_FILE_NOT_FOUND" in p for p in problems), problems


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: tests/test_browser.py REPORT.html OUT.png")
    binary = find_chromium()
    if binary is None:
        sys.exit("error: chromium not found (apt-get install -y chromium)")
    with Chromium(binary) as b:
        b.open(Path(sys.argv[1]).resolve().as_uri())
        print(json.dumps({"problems": b.problems(), **json.loads(b.evaluate(PAGE_FACTS))}, default=str)[:2000])
        b.screenshot(Path(sys.argv[2]))
