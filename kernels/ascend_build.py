"""Build the Ascend C custom-op package of kernels/ascend where CANN is installed; skip cleanly elsewhere.

The package holds RotaryCogvlm2 and PagedAttentionCogvlm2 (op_host: definition + tiling, op_kernel: Ascend C).
The build follows CANN's custom-op project flow (the same one MindSpore's custom_compiler drives): copy CANN's
Ascend C op-project template, drop our op_host/op_kernel sources in, point CMakePresets.json at the toolkit and
the SoCs, run its build.sh, which produces build_out/custom_opp_<os>_<arch>.run. Installing that .run puts the
ops under <install path>/vendors/cogvlm2; ASCEND_CUSTOM_OPP_PATH must then include that directory.

    python -m kernels.ascend_build [--build-dir DIR] [--soc ascend910b --soc ascend310p] [--install-path DIR]

`build_ascend_kernels` never raises for a missing or failing toolkit: it prints why and returns False, so
setup.py can call it unconditionally.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ASCEND_SOURCES = Path(__file__).resolve().parent / "ascend"
CANN_ENV_VARS = ("ASCEND_HOME_PATH", "ASCEND_TOOLKIT_HOME", "ASCEND_CANN_PACKAGE_PATH")
DEFAULT_CANN_ROOTS = ("/usr/local/Ascend/ascend-toolkit/latest", "/usr/local/Ascend/cann",
                      "~/Ascend/ascend-toolkit/latest", "~/Ascend/cann")
DEFAULT_SOCS = ("ascend910b", "ascend310p")
VENDOR = "cogvlm2"
# Where toolkits of different CANN versions keep the Ascend C compiler (ccec, or bisheng in newer ones).
COMPILER_PATHS = ("compiler/ccec_compiler/bin/ccec", "bin/ccec", "bin/bisheng", "compiler/bin/bisheng",
                  "tools/bisheng_compiler/bin/bisheng")
TEMPLATE_PATHS = ("tools/op_project_templates/ascendc/customize",
                  "tools/msopgen/template/operator_demo_projects/ascendc_operator_sample")


@dataclass(frozen=True)
class CannToolkit:
    root: Path
    compiler: Path
    template: Path


def log(message: str) -> None:
    print(f"[ascend] {message}", flush=True)


def cann_roots() -> list[Path]:
    """Candidate toolkit roots: the CANN environment variables first, then the usual install places."""
    roots = [os.environ[v] for v in CANN_ENV_VARS if os.environ.get(v)] + list(DEFAULT_CANN_ROOTS)
    return [Path(r).expanduser() for r in dict.fromkeys(roots)]


def find_cann(roots: list[Path] | None = None) -> tuple[CannToolkit | None, list[str]]:
    """The first root with an Ascend C compiler and an op-project template, plus notes on every root tried."""
    notes = []
    for root in roots if roots is not None else cann_roots():
        root = Path(root)
        if not root.is_dir():
            notes.append(f"{root}: not found")
            continue
        compiler = next((root / p for p in COMPILER_PATHS if (root / p).is_file()), None)
        compiler = compiler or next(iter(sorted(root.glob("*-linux/ccec_compiler/bin/ccec"))), None)
        if compiler is None:
            notes.append(f"{root}: no ccec/bisheng compiler")
            continue
        template = next((root / p for p in TEMPLATE_PATHS if (root / p).is_dir()), None)
        if template is None:
            notes.append(f"{root}: no Ascend C op project template")
            continue
        return CannToolkit(root, compiler, template), notes
    return None, notes


def build_ascend_kernels(build_dir: str | Path, soc_versions: tuple[str, ...] = DEFAULT_SOCS,
                         roots: list[Path] | None = None, install_path: str | Path | None = None) -> bool:
    """Build (and optionally install) the custom-op package; False with a printed reason when not possible."""
    toolkit, notes = find_cann(roots)
    if toolkit is None:
        log("skipping the Ascend C kernels: no CANN toolkit with an Ascend C compiler was found "
            f"({'; '.join(notes) or 'no candidate paths'}). Set ASCEND_HOME_PATH to a CANN toolkit to build them.")
        return False
    for tool in ("bash", "cmake"):
        if shutil.which(tool) is None:
            log(f"skipping the Ascend C kernels: CANN found at {toolkit.root} but `{tool}` is not on PATH")
            return False
    build_dir = Path(build_dir).resolve()
    project = build_dir / "CustomProject"
    try:
        _assemble_project(toolkit, project, soc_versions)
    except (OSError, ValueError, KeyError, json.JSONDecodeError) as error:
        log(f"cannot prepare the op project from {toolkit.template}: {error}")
        return False
    build_log = build_dir / "ascend_build.log"
    log(f"building RotaryCogvlm2 and PagedAttentionCogvlm2 for {', '.join(soc_versions)} with {toolkit.compiler}")
    if not _run_logged(_with_cann_env(toolkit, "bash build.sh"), project, build_log):
        log(f"build failed; see {build_log}")
        return False
    packages = sorted((project / "build_out").glob("*.run"))
    if not packages:
        log(f"the build produced no .run package; see {build_log}")
        return False
    log(f"built {packages[0]}")
    if install_path is not None:
        return install_package(toolkit, packages[0], Path(install_path), build_dir / "ascend_install.log")
    return True


def install_package(toolkit: CannToolkit, package: Path, install_path: Path, install_log: Path) -> bool:
    install_path.mkdir(parents=True, exist_ok=True)
    command = _with_cann_env(toolkit, f"bash '{package}' --install-path='{install_path}'")
    if not _run_logged(command, package.parent, install_log):
        log(f"install failed; see {install_log}")
        return False
    log(f"installed under {install_path}; add {install_path / 'vendors' / VENDOR} to ASCEND_CUSTOM_OPP_PATH")
    return True


def _assemble_project(toolkit: CannToolkit, project: Path, soc_versions: tuple[str, ...]) -> None:
    """CANN's template, its sample op removed, our op_host / op_kernel sources in, presets pointed at us."""
    if project.exists():
        shutil.rmtree(project)
    shutil.copytree(toolkit.template, project)
    common = toolkit.template.parent / "common"  # the "customize" template keeps shared cmake helpers beside it
    if toolkit.template.name == "customize" and common.is_dir():
        shutil.copytree(common, project / "cmake" / "util", dirs_exist_ok=True)
    for part in ("op_host", "op_kernel"):
        target = project / part
        target.mkdir(exist_ok=True)
        for old in list(target.glob("*.cpp")) + list(target.glob("*.h")):
            old.unlink()
        for source in sorted((ASCEND_SOURCES / part).iterdir()):
            if source.suffix in (".cpp", ".h"):
                shutil.copy2(source, target / source.name)
    presets_path = project / "CMakePresets.json"
    presets = json.loads(presets_path.read_text(encoding="utf-8"))
    variables = presets["configurePresets"][0]["cacheVariables"]
    variables["ASCEND_CANN_PACKAGE_PATH"]["value"] = str(toolkit.root)
    variables["ASCEND_COMPUTE_UNIT"]["value"] = ";".join(soc_versions)
    variables["vendor_name"]["value"] = VENDOR
    presets_path.write_text(json.dumps(presets, indent=4), encoding="utf-8")
    for script in project.rglob("*.sh"):
        script.chmod(0o755)


def _with_cann_env(toolkit: CannToolkit, command: str) -> str:
    setenv = toolkit.root / "bin" / "setenv.bash"
    prefix = f"source '{setenv}' >/dev/null 2>&1; " if setenv.is_file() else ""
    return f"{prefix}export LD_LIBRARY_PATH='{toolkit.root / 'lib64'}':${{LD_LIBRARY_PATH:-}}; {command}"


def _run_logged(command: str, cwd: Path, log_path: Path) -> bool:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k != "ASCEND_CUSTOM_OPP_PATH"}  # build against CANN's own ops
    with open(log_path, "w", encoding="utf-8") as out:
        result = subprocess.run(["bash", "-c", command], cwd=cwd, stdout=out, stderr=subprocess.STDOUT, env=env,
                                check=False)
    return result.returncode == 0


def installed_package() -> Path | None:
    """The installed custom-op package on ASCEND_CUSTOM_OPP_PATH (<install>/vendors/cogvlm2), if any: the
    registry's sign that RotaryCogvlm2 / PagedAttentionCogvlm2 can be called through ops.Custom."""
    for entry in os.environ.get("ASCEND_CUSTOM_OPP_PATH", "").split(":"):
        path = Path(entry) if entry else None
        if path is not None and path.name == VENDOR and (path / "op_impl").is_dir():
            return path
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--build-dir", default="build/ascend")
    parser.add_argument("--soc", action="append", help="ascend910b, ascend310p, ... (repeat; default: both)")
    parser.add_argument("--install-path", help="install the .run package here")
    args = parser.parse_args(argv)
    socs = tuple(args.soc) if args.soc else DEFAULT_SOCS
    return 0 if build_ascend_kernels(args.build_dir, socs, install_path=args.install_path) else 1


if __name__ == "__main__":
    sys.exit(main())
