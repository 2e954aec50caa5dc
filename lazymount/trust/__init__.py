"""The trust decision: lazymount's keyring and signature checks of clearsigned manifests."""
