"""DirectDriveX reference client: resumable uploads over the WebSocket protocol.

Stands alone (no Django): `python -m ddxclient upload FILE --server URL --token T`.
"""
