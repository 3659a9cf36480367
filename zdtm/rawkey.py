# A raw-mode terminal program (as vim or a REPL with readline): it puts its
# terminal in raw mode and answers every key at once, without Enter and
# without the terminal echoing it. "q" ends it, with the terminal put back.
import os
import sys
import termios
import tty

fd = sys.stdin.fileno()
saved = termios.tcgetattr(fd)
tty.setraw(fd)
try:
    os.write(1, b"raw and ready\r\n")
    while True:
        k = os.read(fd, 1)
        os.write(1, b"key " + k + b"\r\n")
        if k == b"q":
            break
finally:
    termios.tcsetattr(fd, termios.TCSADRAIN, saved)
