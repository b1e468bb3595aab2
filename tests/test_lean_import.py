"""The planning core never imports torch (or transformers): it must run anywhere and start instantly."""

import subprocess
import sys

CORE = [
    "cachefit",
    "cachefit.units",
    "cachefit.sizes",
    "cachefit.activations",
    "cachefit.plan",
    "cachefit.profile",
    "cachefit.profile.hf_config",
    "cachefit.profile.presets",
    "cachefit.profile.transformer",
    "cachefit.hardware",
    "cachefit.compress",
    "cachefit.partition.contiguous",
    "cachefit.partition.split",
    "cachefit.partition.search",
    "cachefit.report.tables",
    "cachefit.cli",
]


def test_core_imports_no_torch():
    code = (
        "import sys\n"
        + "".join(f"import {m}\n" for m in CORE)
        + "from cachefit.profile import profile_model\n"
        + "from cachefit.partition.search import plan_partition\n"
        + "from cachefit.hardware import get_device, make_cluster\n"
        + "plan_partition(profile_model('gpt2'), make_cluster(get_device('h100')))\n"
        + "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'matplotlib'))\n"
        + "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
