"""The one owner of what dsv3c writes to disk: folders, manifests, the weight layout, atomic writes, op names.

A floor of the package (like `errors`): it imports only `dsv3c.errors`, onnx, onnx_ir, numpy, ml_dtypes and
the standard library, and every other package reads and writes folders only through it.

    dsv3c.artifact.names           DOMAIN, MLA_OP, MOE_OP, MANIFEST_FILE, ENGINE_MANIFEST_FILE, WEIGHTS_FILE, ROLES,
                                   mtp_role, mtp_roles
    dsv3c.artifact.manifest        Manifest (+ TensorInfo, Signature, CacheLayout), read_manifest, write_manifest
    dsv3c.artifact.engine_manifest EngineManifest (+ EngineRecord, TensorRecord, LayerSummary, ShapeRange)
    dsv3c.artifact.weights         the weights file: plan_layout, Layout, WeightsWriter, read_slots, read_slot
    dsv3c.artifact.export_folder   an export folder as onnx_ir models: read_export, write_export, mark_weight
    dsv3c.artifact.atomic          atomic_folder, atomic_file, write_text: temporary sibling + rename, and the
                                   rules that keep user data safe (no output over an input; --force replaces
                                   only what dsv3c wrote; killed runs' temporaries cleaned up)
    dsv3c.artifact.provenance      the dsv3c.stage / dsv3c.rewrite / dsv3c.origin marks passes put on nodes
"""
