# Sourced by the GPU scripts that time startup: gives Python the bytecode cache an installed package has.
#
# pip compiles a package's bytecode when it installs it. The lent GPU machines' Python found no bytecode for
# torch and wrote none, so every fresh process compiled ~2,600 modules from source: under cProfile, 8.7 s of a
# warm start's 24.6 s (Llama-3.2-1B, H200 host, 2026-11-28; `builtins.compile`, 3,246 calls). Compile the
# packages a start imports once, into a writable cache, and point every process at it.
export PYTHONPYCACHEPREFIX=${PYTHONPYCACHEPREFIX:-/tmp/tfbackend-pycache}
python3 - <<'PY'
import compileall, os, sys, time

started = time.perf_counter()
print(f"bytecode: dont_write_bytecode={sys.flags.dont_write_bytecode}, "
      f"PYTHONDONTWRITEBYTECODE={os.environ.get('PYTHONDONTWRITEBYTECODE')!r}, cache {sys.pycache_prefix}")
import tfbackend.engine.llm_engine, tfbackend.entrypoints.cli  # noqa: E401,F401  what a start imports...
import torch._dynamo, torch._inductor.compile_fx, triton  # noqa: E401,F401  ...and what compiling adds
packages = {name.split(".")[0] for name in list(sys.modules)}
folders = {os.path.dirname(module.__file__) for name in packages
           if (module := sys.modules.get(name)) is not None and (getattr(module, "__file__", None) or "").endswith("__init__.py")}
for folder in sorted(folders):  # quiet=2: torch ships test files in newer syntax than some interpreters read
    compileall.compile_dir(folder, quiet=2, workers=os.cpu_count())
print(f"bytecode: {len(folders)} packages compiled in {time.perf_counter() - started:.1f} s")
PY
