# A real program with unix sockets: python3 serving a socketserver
# UnixStreamServer (a thread per connection) on a path, with a client
# connection whose answer waits unread across the dump, and a
# multiprocessing worker talking over a Pipe (a socketpair) to a forked
# child. After restore the old connection, a new one and the worker all
# answer; the program prints PASS.
import multiprocessing
import os
import signal
import socket
import socketserver
import threading
import time

path = os.path.join(os.environ["ZDTM_DIR"], "py.sock")


class Echo(socketserver.StreamRequestHandler):
    def handle(self):
        for line in self.rfile:
            self.wfile.write(b"echo " + line)


class Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True


def squarer(conn):
    while True:
        n = conn.recv()
        if n is None:
            return
        conn.send(n * n)


def ask(f, line):
    f.write(line + b"\n")
    f.flush()
    return f.readline()


def main():
    # SIGTERM is taken by sigwait below: blocked in every thread.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    srv = Server(path, Echo)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    parent, child = multiprocessing.get_context("fork").Pipe()
    worker = multiprocessing.get_context("fork").Process(target=squarer, args=(child,))
    worker.start()
    parent.send(7)
    assert parent.recv() == 49
    c = socket.socket(socket.AF_UNIX)
    c.connect(path)
    f = c.makefile("rwb")
    assert ask(f, b"before") == b"echo before\n"
    # Its answer arrives while nobody reads: it waits in the queue.
    f.write(b"queued\n")
    f.flush()
    time.sleep(0.2)
    open(os.environ["ZDTM_READY"], "w").close()
    signal.sigwait({signal.SIGTERM})

    got = f.readline()
    assert got == b"echo queued\n", got
    assert ask(f, b"after") == b"echo after\n"
    c2 = socket.socket(socket.AF_UNIX)
    c2.connect(path)
    assert ask(c2.makefile("rwb"), b"new") == b"echo new\n"
    parent.send(12)
    assert parent.recv() == 144
    parent.send(None)
    worker.join()
    assert worker.exitcode == 0, worker.exitcode
    print("PASS", flush=True)


main()
