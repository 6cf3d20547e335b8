"""One module per command or family; cli.py names each command's handler and imports its module only to run it.

- ``common``: what several commands share (Io, the profile, the MFA session, region and endpoint advice, exports)
- ``service``: start, stop, status
- ``roles``: assume, export
- ``exec``: exec, credential-process
- ``console``: console
- ``install``: install-service
- ``shell``: shell-init, completion
"""
