"""The master's end of each host of its own (local, SSH, Slurm, command):
the byte transports, the link per worker and its outbox, the inbox every
link's events arrive in, request/answer waits, shipping packages, and the
one table that turns foreign exceptions into qjamfab's."""
