/* SysV shared memory: a keyed segment attached by this process and its
 * child, and a private one removed while attached (gone for good once the
 * dump killed its users, so the restore must make it again). After restore
 * both are attached at their addresses with their contents and ids, shared
 * with the child, and the removed one is still removed. */
#include "zdtmlib.h"
#include <sys/ipc.h>
#include <sys/shm.h>
#include <sys/wait.h>

#define SZ (3 * 4096 + 100)

int main(void)
{
	test_init();
	key_t key = 0x5ee0000 | (getpid() & 0xffff);
	int keyed = shmget(key, SZ, IPC_CREAT | IPC_EXCL | 0640);
	int priv = shmget(IPC_PRIVATE, 2 * 4096, IPC_CREAT | 0600);
	if (keyed < 0 || priv < 0)
		fail("shmget: %m");
	char *a = shmat(keyed, NULL, 0);
	char *b = shmat(priv, NULL, SHM_RDONLY);
	char *bw = shmat(priv, NULL, 0);
	for (int i = 0; i < SZ; i++)
		a[i] = (char)(i * 7);
	memset(bw, 'q', 2 * 4096);
	shmdt(bw);
	shmctl(priv, IPC_RMID, NULL); /* stays while attached */
	int ready[2];
	pipe(ready);
	pid_t child = fork();
	if (child == 0) {
		write(ready[1], "r", 1);
		test_waitsig();
		/* The parent wrote "hello" after the restore. */
		_exit(!memcmp(a + 5000, "hello", 5) && b[100] == 'q' ? 0 : 1);
	}
	char c;
	read(ready[0], &c, 1);
	test_ready();
	test_waitsig();

	for (int i = 0; i < SZ; i++)
		if (a[i] != (char)(i * 7))
			fail("keyed segment differs at %d", i);
	for (int i = 0; i < 2 * 4096; i++)
		if (b[i] != 'q')
			fail("removed segment differs at %d", i);
	if (shmget(key, 0, 0) != keyed)
		fail("key %#x names segment %d, not %d", key, shmget(key, 0, 0), keyed);
	struct shmid_ds ds;
	if (shmctl(priv, IPC_STAT, &ds) || !(ds.shm_perm.mode & SHM_DEST))
		fail("the removed segment %d is not marked removed", priv);
	memcpy(a + 5000, "hello", 5);
	kill(child, SIGTERM);
	int st;
	waitpid(child, &st, 0);
	if (!WIFEXITED(st) || WEXITSTATUS(st))
		fail("the child does not share the segments (status %#x)", st);
	shmdt(a);
	shmctl(keyed, IPC_RMID, NULL);
	pass();
}
