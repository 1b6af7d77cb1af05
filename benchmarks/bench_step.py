"""Per-step cost of training, per model in harness.models.MODELS, and the harness's overhead.

Model, arms, batch and probe are built in setup (outside the timed region) the way
harness.runner.run_seed builds them; the timed code is the harness's own ArmState.step and
observers. Times are CPU seconds (_common.TIMER); docs/benchmarks.md quotes them in ms. All figures are
lower-is-better.
"""
from ._common import (CYCLE, MODEL_CASES, QUICK, TIMER, RawLoop, amortized_observer_seconds, best_of,
                      lockstep_state, lockstep_update)

# The CI smoke (scripts/asv-quick) runs each benchmark on one MLP and one CNN: every model runs the
# same benchmark code, and each parameter costs 1.5-3 s of set-up and imports in its own process
# (the whole smoke: 80 s -> 50 s on 2 cores). Nightly and `asv run` measure every model.
QUICK_MODELS = ("norm_mlp", "norm_cnn")
MODELS = [m for m in MODEL_CASES if not QUICK or m in QUICK_MODELS]
# The in-process ratios alternate short chunks of the two variants (ROUNDS chunks of INNER calls
# each) and compare the best chunk of each: load from other processes hits both alike, and the
# minimum is the figure it disturbs least. About 1-6 s per ratio on 1 thread.
INNER = {"norm_mlp": 100, "norm_cnn": 50, "resnet18_cifar": 1, "wrn16_4": 1, "two_layer_relu": 100,
         "sphere_mlp": 100}
ROUNDS = ({"norm_mlp": 3, "norm_cnn": 3, "resnet18_cifar": 1, "wrn16_4": 1, "two_layer_relu": 3, "sphere_mlp": 3}
          if QUICK else
          {"norm_mlp": 15, "norm_cnn": 15, "resnet18_cifar": 3, "wrn16_4": 3, "two_layer_relu": 15, "sphere_mlp": 15})


def ratio(model: str, candidate, baseline) -> float:
    """best CPU seconds per call of `candidate` / best of `baseline`, interleaved in this process."""
    cand, base = [], []
    for _ in range(ROUNDS[model]):
        base.append(best_of(baseline, 1, INNER[model]))
        cand.append(best_of(candidate, 1, INNER[model]))
    return min(cand) / min(base)


class LockstepUpdate:
    """One iteration of the runner's loop for a 2-arm (WD vs exp-LR) case: both arms step on the
    same batch; with `measured`, every observer the case declares runs too (each one once, as on a
    step where all of them fire)."""

    params = (MODELS, [False, True])
    param_names = ("model", "measured")
    timer = TIMER
    repeat = (1, 5, 10.0)  # ResNet-18 with measurements is ~1 s a call: cap the samples

    def setup(self, model, measured):
        self.s = lockstep_state(model)
        lockstep_update(self.s, measured)  # the first call allocates momentum buffers

    def time_update(self, model, measured):
        lockstep_update(self.s, measured)


class ArmStep:
    """One arm's step through harness.runner.ArmState.step against the minimal hand-written loop
    (zero_grad, forward, cross_entropy, backward, SGD step) on the same model and batch."""

    params = MODELS
    param_names = ("model",)
    repeat = (1, 5, 10.0)
    timer = TIMER

    def setup(self, model):
        self.s = lockstep_state(model)
        self.arm = self.s.arms[self.s.ctx.reference]  # the WD arm; the raw loop copies its settings
        self.raw = RawLoop(self.s)
        self.arm_step()
        self.raw.step()

    def arm_step(self):
        self.arm.step(self.s.k % CYCLE, self.s.x, self.s.y)
        self.s.k += 1

    def time_raw_loop(self, model):
        self.raw.step()

    def time_harness_arm_step(self, model):
        self.arm_step()

    def track_harness_overhead(self, model):
        """ArmState.step time / raw loop step time, same process (budget: <= 1.05)."""
        return ratio(model, self.arm_step, self.raw.step)

    track_harness_overhead.unit = "ratio"


class MeasurementOverhead:
    """(Lock-step update + the case's observers, each amortized over its `every`) / the bare update,
    same process (budget: <= 1.10). The observers are those the model's case declares: for the CPU
    cases the free batch gap every step and the probe gap every 25th step, for ResNet-18 its GPU
    case's once-per-epoch measurements."""

    params = MODELS
    param_names = ("model",)

    def setup(self, model):
        self.s = lockstep_state(model)
        lockstep_update(self.s, True)

    def track_measurement_overhead(self, model):
        observers, update = [], []
        for _ in range(ROUNDS[model]):
            update.append(best_of(lambda: lockstep_update(self.s, False), 1, INNER[model]))
            observers.append(amortized_observer_seconds(self.s, 1, INNER[model]))
        return 1 + min(observers) / min(update)

    track_measurement_overhead.unit = "ratio"
