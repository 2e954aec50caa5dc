"""The extended attributes lazymount shows, by name; the mount serves them and commands
read them."""

STATUS = "user.lazymount.status"  # on a prefix (and a ready store tree): absent,
# materializing, ready, opened: <how much of it is there>, or failed: <reason>
PROJECTION = "user.lazymount.projection"  # on the root: for `lazymount spack-config`
STORE = "user.lazymount.store"  # on the root: the store directory (for `lazymount fsck`)
TARGET = "user.lazymount.target"  # on a prefix: its target, and whether it runs here
CHOICE = "user.lazymount.choice"  # on host/<name>: each version's choice, alternatives
