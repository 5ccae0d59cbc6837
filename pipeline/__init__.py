"""Pure computation for spine-node: a CT volume in, vertebra findings and DICOM results out.

Imports neither :mod:`storage` nor :mod:`dicom_node` (see ../shared/DESIGN.md, "Rooms").
"""
