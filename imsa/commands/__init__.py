"""One module per command or family; cli.py names each command's handler and imports its module only to run it.

- ``common``: what several commands share (Io, the profile or the per-directory one, the MFA session, region and
  endpoint advice, expiry warnings)
- ``service``: start, stop, status
- ``prompt``: status --short, light enough for every prompt
- ``roles``: assume, export (every format, credentials files)
- ``exec``: exec, credential-process
- ``console``: console
- ``install``: install-service
- ``shell``: shell-init, completion
"""
