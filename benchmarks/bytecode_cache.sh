# Sourced by the GPU scripts that time startup: gives Python the bytecode cache an installed package has.
#
# pip compiles a package's bytecode when it installs it. The lent GPU machines run Python with
# PYTHONDONTWRITEBYTECODE=1 and torch installed without bytecode, so every fresh process compiled ~2,600 modules
# from source: under cProfile, 8.7 s of a warm start's 24.6 s (Llama-3.2-1B, H200 host, 2026-11-28;
# `builtins.compile`, 3,246 calls). Compile the packages a start imports once, into a writable cache, and point
# every process at it (Python reads a bytecode cache even where it writes none).
export PYTHONPYCACHEPREFIX=${PYTHONPYCACHEPREFIX:-/tmp/tfbackend-pycache}
# Once per cache: gpu_startup_run.sh sources this, then runs startup_check.sh, which sources it too.
[[ "${TFBACKEND_BYTECODE_CACHED:-}" == "$PYTHONPYCACHEPREFIX" ]] && return 0
_bytecode_started=$SECONDS
# The packages (folders) that a start imports, compiling included; then compileall's own process pool (a pool
# started from a process that has imported torch's compiler stack broke on the GPU machine).
_bytecode_folders=$(python3 -c '
import os, sys
import tfbackend.engine.llm_engine, tfbackend.entrypoints.cli  # what a start imports...
import torch._dynamo, torch._inductor.compile_fx, triton  # ...and what compiling adds
for name in sorted({name.split(".")[0] for name in list(sys.modules)}):
    path = getattr(sys.modules.get(name), "__file__", None) or ""
    if path.endswith("__init__.py"):
        print(os.path.dirname(path))
')
# -qq: torch ships test files in newer syntax than some interpreters read; those stay uncompiled.
python3 -m compileall -qq -j 0 $_bytecode_folders
echo "bytecode: $(wc -w <<< "$_bytecode_folders") packages compiled into $PYTHONPYCACHEPREFIX in $((SECONDS - _bytecode_started)) s"
export TFBACKEND_BYTECODE_CACHED=$PYTHONPYCACHEPREFIX
