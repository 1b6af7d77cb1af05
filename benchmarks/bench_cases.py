"""CPU seconds per CPU case, start to verdict, through harness.session.execute (what the CLI and the
pytest front both call), on the default optimizer and the case's own seeds."""
from ._common import QUICK, TIMER, safe_import, warm_torch_optim

with safe_import():
    from harness import registry
    from harness.runner import RunEnv
    from harness.session import execute

# Representative CPU cases: an MLP (Thm 2.9, seeded buffer), a BN CNN (zero-buffer form), and the
# slowest exact case (instance norm: 3 arms incl. the roundoff twin, 3 seeds).
CASES = ["wdexp-thm2.9-mlp-bn", "wdexp-zerobuf-cnn-bn", "wdexp-zerobuf-cnn-in"]
if QUICK:  # the CI smoke: the same code on the two short cases (the instance-norm one is 2.3 s a call)
    CASES = CASES[:2]


def run_case(case_id: str) -> None:
    outcome = execute(registry.get(case_id), RunEnv(device="cpu"))
    if outcome.status != "ok":  # a timing of a broken case means nothing: fail the benchmark
        raise RuntimeError(f"{case_id}: {outcome.status}: {outcome.message}")


class CaseRun:
    params = CASES
    param_names = ("case",)
    number = 1  # each call is a whole case (0.2 s to 2 s on 1 thread)
    repeat = (1, 3, 20.0)
    warmup_time = 0
    timeout = 300
    timer = TIMER  # CPU seconds: a case runs on 1 thread

    def setup(self, case_id):
        warm_torch_optim()
        registry.get(case_id)  # unknown id: fail here, not in the timed region

    def time_case(self, case_id):
        run_case(case_id)

    def peakmem_case(self, case_id):
        run_case(case_id)
