"""The examples' argument defaults, checked in-process without running them (the scripts run as
subprocesses in tests/e2e/test_examples.py), and the extra that the demo installs."""

import argparse
import importlib.util
from pathlib import Path

import pytest

from fp_compile import FlashPrefillConfig

ROOT = Path(__file__).resolve().parent.parent


class _Parsed(Exception):
    pass


def parsed_args(name, argv=()):
    """The Namespace examples/<name>'s main(argv) parses; main stops right after parsing."""
    spec = importlib.util.spec_from_file_location(f"example_{Path(name).stem}",
                                                  ROOT / "examples" / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    parse = argparse.ArgumentParser.parse_args

    def stop(self, args=None, namespace=None):
        raise _Parsed(parse(self, args, namespace))

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(argparse.ArgumentParser, "parse_args", stop)
        with pytest.raises(_Parsed) as exc:
            module.main(list(argv))
    return exc.value.args[0]


# Bug 9: three examples defaulted to --alpha 0.0, so they only ever showed the dense case.
@pytest.mark.parametrize("name", ["compile_hf_model.py", "export_aoti.py",
                                  "handwritten_model.py", "plot_block_mask.py"])
def test_examples_default_to_the_configs_alpha(name):
    assert parsed_args(name).alpha == FlashPrefillConfig().alpha


def test_demo_extra_installs_triton():
    """Bug 9: importing fp_compile without triton prints torch's "Triton not available" warning
    (torch.library.triton_op looks for kernels when ops.py registers the op); the demo extra
    installs triton where it exists, as the test extra does."""
    import tomllib

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert any(dep.replace(" ", "").startswith("triton>=3.6;platform_system=='Linux'")
               for dep in extras["demo"]), extras["demo"]
