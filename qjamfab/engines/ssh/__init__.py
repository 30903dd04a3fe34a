"""The `ssh` engine: OpenSSH's client command line, Fabric/paramiko
connections, the known_hosts policy, and the engine itself (engine.py)."""
