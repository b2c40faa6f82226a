//! Label files: `parse_documents`, and the relay's validation of every label it yields, never
//! panic on any text. (That no error quotes a Secret's value is a property test:
//! relay/tests/prop_label_files.rs.)
#![no_main]

use libfuzzer_sys::fuzz_target;
use taas_crds::manifest::{parse_documents, Object};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(objects) = parse_documents(text) {
        for object in &objects {
            if let Object::Label(label) = object {
                for secret in [b"MZXW6YTBOJZWC3DUMFZWK4TFOQ4XI33Q".as_slice(), data] {
                    let _ = taas_relay::label_source::validate_label(&label.spec, secret);
                }
            }
        }
    }
});
