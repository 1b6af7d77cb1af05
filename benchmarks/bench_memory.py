"""Peak memory (the process's peak RSS, which is what asv's peakmem_ measures) of the CIFAR-10
data layer, and the floor that every peakmem figure includes."""
import os

from ._common import CHECKOUT, safe_import, warm_torch_optim

with safe_import():
    from harness import cifar

DATA = os.environ.get("HARNESS_DATA") or str(CHECKOUT.parent / "shared" / "data")  # the Makefile's default


class Baseline:
    def setup(self):
        warm_torch_optim()

    def peakmem_baseline(self):
        """Interpreter + torch + harness + torch.optim's lazy imports: subtract it from the others."""


class CifarCache:
    """harness.cifar.load_cifar10 from its uint8 cache (60,000 images: 184 MB of arrays)."""

    timeout = 300  # on a fresh machine setup_cache decodes the JPEGs once (about 5 s here)

    def setup_cache(self):
        warm_torch_optim()
        try:
            cifar.load_cifar10(DATA)  # builds the cache on first use, so the measured loads hit it
        except cifar.DataNotFound:
            return ""  # not None: asv passes no argument at all for a None cache
        return DATA

    def setup(self, root):
        warm_torch_optim()
        if not root:  # asv reports a benchmark whose setup raises NotImplementedError as skipped
            raise NotImplementedError(f"CIFAR-10 not found under {DATA} (set HARNESS_DATA)")

    def peakmem_load_cifar10(self, root):
        cifar.load_cifar10(root)

    def time_load_cifar10(self, root):
        cifar.load_cifar10(root)
