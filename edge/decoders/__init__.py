"""Pure-Python decoders that turn raw kernel values in edge events into readable labels."""
