"""The storage SCP's fast receive path (``node.fast_path``, issue 8 and issue 25).

- :mod:`.codec`: the pure encoding and decoding (P-DATA-TF PDUs, C-STORE-RQ command sets,
  C-STORE-RSP), functions of bytes that the tests compare with pynetdicom's.
- :mod:`.hooks`: subclasses of pynetdicom's association, DUL and DIMSE providers, socket and
  request handler, which only the storage SCP's server creates
  (:class:`dicom_node.acceptors.StorageServer`); no pynetdicom class is modified, and every
  other association of the process (the exporter's) is pynetdicom's own.
"""
