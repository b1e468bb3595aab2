"""The planning core never imports torch (or transformers): it must run anywhere and start instantly."""

import subprocess
import sys

CORE = [
    "cachefit",
    "cachefit.units",
    "cachefit.sizes",
    "cachefit.profile.activations",
    "cachefit.plan",
    "cachefit.profile",
    "cachefit.profile.hf_config",
    "cachefit.profile.presets",
    "cachefit.profile.transformer",
    "cachefit.hardware",
    "cachefit.compress",
    "cachefit.compress.quality_profile",
    "cachefit.partition.contiguous",
    "cachefit.partition.split",
    "cachefit.plan.search",
    "cachefit.plan.quality",
    "cachefit.report.tables",
    "cachefit.cli",
]


def test_core_imports_no_torch():
    code = (
        "import sys\n"
        + "".join(f"import {m}\n" for m in CORE)
        + "from cachefit.profile import profile_model\n"
        + "from cachefit.plan.search import plan_partition\n"
        + "from cachefit.hardware import get_device, make_cluster\n"
        + "plan_partition(profile_model('gpt2'), make_cluster(get_device('h100')))\n"
        + "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'matplotlib'))\n"
        + "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_python_api_is_lazy_and_complete():
    code = (
        "import sys, cachefit\n"
        "assert 'cachefit.plan.search' not in sys.modules\n"
        "prof = cachefit.profile_model('gpt2', cachefit.Workload(batch=1, seq_len=128, mode='decode'))\n"
        "plan, _ = cachefit.plan_partition(prof, cachefit.make_cluster(cachefit.device_from_capacity('100MB')))\n"
        "assert plan.feasible\n"
        "assert not any(m.split('.')[0] == 'torch' for m in sys.modules)\n"
        "for name in cachefit.__all__:\n"
        "    if name != 'profile_module':\n"
        "        getattr(cachefit, name)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
