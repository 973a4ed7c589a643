set -u
cd "$(dirname "$0")" 2>/dev/null || true
timeout 60 python3 scripts/attention_backends.py 2>&1 | tee $OUT/attention_backends.txt
timeout 170 python3 -m pytest tests/test_cuda.py tests/test_augment.py -k cuda -q -rfE -p no:cacheprovider > $OUT/tests.log 2>&1; echo "tests exit $?" >> $OUT/tests.log
tail -3 $OUT/tests.log
