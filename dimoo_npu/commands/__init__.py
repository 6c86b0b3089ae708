"""One module per `dimoo` command (see `dimoo_npu.cli`)."""
