"""Operations over the running pipeline (publish, replay, re-drive,
report, verify): above streams and sinks, below the command line."""
