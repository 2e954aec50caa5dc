"""A mount as a long-running service: live index refresh and reload (``live``), what it
reports about itself (``status``, ``metrics``), and the socket that asks it (``control``)."""
