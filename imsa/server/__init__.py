"""The service, and the code it shares with the command line; nothing here imports imsa.config (~/.imsa's loader).

- ``process``: root's acts (alias, bind), the privilege drop, waitress, signals, the ready line to ``imsa start``
- ``imds``, ``control``: the Flask apps of the IMDS and the control plane
- ``container``: the container-credentials endpoint ``imsa exec`` serves in its own process (standard library only)
- ``store``: sessions and role credentials in memory, the refresher thread
- ``execs``: the running ``imsa exec`` commands and the profiles they pin
- ``peers``: who is connecting (``SO_PEERCRED``, ``sock_diag``)
- ``logs``: the service's log, refusals rate-limited and escaped
"""
