"""``import hf_adamp`` stays cheap: transformers is imported by the user's script, not by us."""

import subprocess
import sys


def test_import_hf_adamp_imports_no_transformers_module():
    code = "import sys, hf_adamp; print(sorted(m for m in sys.modules if m.split('.')[0] == 'transformers'))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"


def test_names_are_registered_once_transformers_is_imported():
    code = (
        "import hf_adamp\n"
        "from transformers import TrainingArguments\n"
        "args = TrainingArguments('out', optim='adamp', report_to='none', use_cpu=True)\n"
        "print(args.optim.value)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "adamp"
