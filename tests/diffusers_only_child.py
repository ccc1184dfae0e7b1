"""Run a Python file in a process where ldm_users cannot be imported (for tests/test_export.py).

    python -I tests/diffusers_only_child.py SCRIPT [ARGS...]

`-I` keeps PYTHONPATH and the user site out; the editable install of ldm_users in site-packages is refused by a
meta-path finder, so the script sees what a diffusers user without ldm-users has: torch, diffusers and the files
of the export.
"""

import runpy
import sys


class RefuseLdmUsers:
    def find_spec(self, name, path=None, target=None):
        if name == "ldm_users" or name.startswith("ldm_users."):
            raise ImportError(f"{name}: ldm_users is not installed here (diffusers-only process)")
        return None


sys.meta_path.insert(0, RefuseLdmUsers())
script, sys.argv = sys.argv[1], sys.argv[1:]
runpy.run_path(script, run_name="__main__")
assert not [m for m in sys.modules if m.startswith("ldm_users")], "ldm_users was imported"
