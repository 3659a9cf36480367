# A real program: python3 mid-computation. Sums i*i for i < N with a
# growing list (heap) and prints the sum, which the runner checks against
# the closed form. The dump lands in the middle of the loop.
import os
import sys

n = int(sys.argv[1])
open(os.environ["ZDTM_READY"], "w").close()
s = 0
keep = []
for i in range(n):
    s += i * i
    if i % 100000 == 0:
        keep.append(str(s))
assert keep[-1] == str(sum(j * j for j in range(((n - 1) // 100000) * 100000 + 1)))
print(s)
