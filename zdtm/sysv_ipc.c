/* SysV semaphores and message queues: a set of three semaphores and a
 * queue holding three messages, both last used by this process. The runner
 * removes both between dump and restore, so the restore must make them
 * again with their ids, values and messages. */
#include "zdtmlib.h"
#include <sys/ipc.h>
#include <sys/msg.h>
#include <sys/sem.h>

struct msg {
	long mtype;
	char text[32];
};

int main(void)
{
	test_init();
	key_t skey = 0x5e50000 | (getpid() & 0xffff), qkey = 0x5e40000 | (getpid() & 0xffff);
	int sem = semget(skey, 3, IPC_CREAT | IPC_EXCL | 0640);
	int q = msgget(qkey, IPC_CREAT | IPC_EXCL | 0620);
	if (sem < 0 || q < 0)
		fail("semget/msgget: %m");
	unsigned short vals[3] = { 1, 5, 9 };
	semctl(sem, 0, SETALL, vals);
	struct sembuf op = { 1, 2, 0 }; /* sem 1: 5 -> 7, and we are its last user */
	semop(sem, &op, 1);
	const char *texts[] = { "first", "second", "third", "fourth" };
	for (int i = 0; i < 4; i++) {
		struct msg m = { i + 1, "" };
		snprintf(m.text, sizeof(m.text), "%s", texts[i]);
		msgsnd(q, &m, strlen(m.text) + 1, 0);
	}
	struct msg m;
	msgrcv(q, &m, sizeof(m.text), 0, 0); /* "first" is gone */
	test_ready();
	test_waitsig();

	unsigned short now[3];
	if (semctl(sem, 0, GETALL, now) || now[0] != 1 || now[1] != 7 || now[2] != 9)
		fail("semaphore values %d %d %d", now[0], now[1], now[2]);
	if (semget(skey, 0, 0) != sem)
		fail("key %#x names semaphore set %d, not %d", skey, semget(skey, 0, 0), sem);
	for (int i = 1; i < 4; i++) {
		memset(&m, 0, sizeof(m));
		if (msgrcv(q, &m, sizeof(m.text), 0, IPC_NOWAIT) < 0)
			fail("message %d is missing: %m", i);
		if (m.mtype != i + 1 || strcmp(m.text, texts[i]))
			fail("message %d is %ld \"%s\"", i, m.mtype, m.text);
	}
	if (msgrcv(q, &m, sizeof(m.text), 0, IPC_NOWAIT) >= 0)
		fail("an extra message is queued");
	semctl(sem, 0, IPC_RMID);
	msgctl(q, IPC_RMID, NULL);
	pass();
}
