# A real program: python3 with a periodic ITIMER_REAL of 2 ms. The timer
# fires while the task is frozen for the dump (the signal waits, the time
# left reads 0): after the restore it must go on firing. On SIGTERM the
# program counts the alarms of the next 300 ms and says PASS or FAIL.
import os
import signal
import sys
import time

ticks = 0
stop = False


def on_alarm(sig, frame):
    global ticks
    ticks += 1


def on_term(sig, frame):
    global stop
    stop = True


signal.signal(signal.SIGALRM, on_alarm)
signal.signal(signal.SIGTERM, on_term)
signal.setitimer(signal.ITIMER_REAL, 0.002, 0.002)
open(os.environ["ZDTM_READY"], "w").close()
x = 0
while not stop:
    x = (x * 31 + 7) % 1000003
before = ticks
end = time.monotonic() + 0.3
while time.monotonic() < end:
    x = (x * 31 + 7) % 1000003
after = ticks - before
signal.setitimer(signal.ITIMER_REAL, 0)
if after < 10:
    print(f"FAIL: {after} alarms in 300 ms after the restore")
    sys.exit(1)
print("PASS")
