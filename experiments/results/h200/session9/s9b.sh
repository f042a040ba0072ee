# session 9 call B: the reductions on the GPU: CUDA tests of the model and engine, then bench_layer before/after
cd .carry/head && export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
R=$OUT/res; mkdir -p $R
T0=$(date +%s); t() { echo "t=$(( $(date +%s) - T0 )) $*"; }
python3 -m pytest -q -k cuda tests/test_engine.py tests/test_real_model.py tests/test_predictors.py tests/test_layer_ops.py > $R/pytest_gpu_b.log 2>&1; echo "pytest rc=$?" >> $R/pytest_gpu_b.log
grep -v DEBUG $R/pytest_gpu_b.log | tail -6; t pytest
timeout 420 python3 -m experiments.bench_layer --out $R/bench_layer --impls sdpa+compiled,sdpa+reductions --repeats 5 > $R/bench_layer.log 2>&1; echo "bench rc=$?"
tail -32 $R/bench_layer.log; t bench
