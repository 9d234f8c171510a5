//! Every WGSL shader parses and validates with naga: no GPU needed.

use cuboids::gpu::kernels::shader_sources;

fn parse(name: &str, source: &str) -> naga::Module {
    naga::front::wgsl::parse_str(source)
        .unwrap_or_else(|e| panic!("{name}.wgsl does not parse:\n{}", e.emit_to_string(source)))
}

#[test]
fn every_shader_validates_with_naga() {
    let sources = shader_sources();
    assert!(sources.len() >= 4);
    for (name, source) in sources {
        let module = parse(name, &source);
        naga::valid::Validator::new(
            naga::valid::ValidationFlags::all(),
            naga::valid::Capabilities::empty(),
        )
        .validate(&module)
        .unwrap_or_else(|e| panic!("{name}.wgsl does not validate: {e:?}"));
    }
}

/// Portable WGSL has no 64-bit integers: uint64 labels travel as `vec2<u32>`.
#[test]
fn shaders_use_no_64_bit_types() {
    for (name, source) in shader_sources() {
        let module = parse(name, &source);
        for (_, ty) in module.types.iter() {
            let scalar = match &ty.inner {
                naga::TypeInner::Scalar(s) => Some(*s),
                naga::TypeInner::Vector { scalar, .. } => Some(*scalar),
                naga::TypeInner::Atomic(s) => Some(*s),
                _ => None,
            };
            if let Some(s) = scalar {
                assert!(s.width <= 4, "{name}.wgsl uses a {}-byte scalar", s.width);
            }
        }
    }
}
