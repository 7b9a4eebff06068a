"""What crosses the wire: topics, the Avro codec, typed records and the change-event contract."""
