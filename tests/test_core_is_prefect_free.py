"""The domain package must not depend on Prefect: importing every module of membercare/ leaves
``prefect`` out of ``sys.modules``. Runs in a subprocess so other tests' imports do not interfere."""

import subprocess
import sys
import textwrap


def test_importing_every_core_module_does_not_import_prefect():
    code = textwrap.dedent(
        """
        import importlib, pkgutil, sys
        import membercare, segments, channels
        names = []
        for pkg in (membercare, segments, channels):
            for m in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + "."):
                if ".migrations" in m.name:
                    continue
                importlib.import_module(m.name)
                names.append(m.name)
        bad = sorted(k for k in sys.modules if k == "prefect" or k.startswith("prefect."))
        print(len(names), "modules;", "prefect loaded" if bad else "prefect not loaded")
        sys.exit(1 if bad else 0)
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
