"""The fetcher: re-reads, through the vendor's API, the records that notifications named but did not carry."""
