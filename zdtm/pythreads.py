# A real threaded runtime: python3 running 8 threads that each sum squares
# over their own range while the process is checkpointed; after restore
# they finish and the main thread prints the total the runner checks.
import os
import sys
import threading

n = int(sys.argv[1])
results = [0] * 8


def work(k):
    s = 0
    for i in range(k * n, (k + 1) * n):
        s += i * i
    results[k] = s


threads = [threading.Thread(target=work, args=(k,), name=f"worker-{k}") for k in range(8)]
for t in threads:
    t.start()
open(os.environ["ZDTM_READY"], "w").close()
for t in threads:
    t.join()
print(sum(results))
