"""The cost model, the report module and the new commands import nothing heavy at module level."""

import subprocess
import sys


def test_cost_and_report_modules_import_no_torch_or_matplotlib():
    code = (
        "import sys\n"
        "import cachefit.cost, cachefit.cost.roofline, cachefit.cost.pipeline, cachefit.cost.baselines\n"
        "import cachefit.report.html, cachefit.report.timeline, cachefit.commands.compare\n"
        "from cachefit.cost import compare_layouts\n"
        "from cachefit.hardware import get_device, make_cluster\n"
        "from cachefit.profile import profile_model\n"
        "compare_layouts(profile_model('gpt2'), make_cluster(get_device('h100')), 2)\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'matplotlib'))\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
