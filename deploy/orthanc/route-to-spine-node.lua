-- Orthanc auto-routing: forward every stable CT series to spine-node.
--
-- Orthanc calls OnStableSeries once no instance of a series has arrived for "StableAge" seconds
-- (orthanc.json). The series is sent by C-STORE to the modality named TARGET in
-- "DicomModalities", as an asynchronous Orthanc job so that a slow or absent node never blocks
-- Orthanc's Lua thread. A failed job stays listed under /jobs and can be resubmitted there
-- (docs/operations.md, "Troubleshooting").
--
-- Not routed: series that are not CT, series the node itself sent back (its SEG, SR and key
-- images arrive with the node's AE title as calling AE), and series Orthanc made by modifying or
-- anonymizing another one.

local TARGET = 'spine-node'   -- key of "DicomModalities" in orthanc.json
local NODE_AET = 'SPINENODE'  -- the node's [node] ae_title: its results must not loop back
local MODALITIES = { CT = true }

local function FirstInstanceMetadata(seriesId, name)
  local instances = ParseJson(RestApiGet('/series/' .. seriesId .. '/instances'))
  if instances[1] == nil then
    return nil
  end
  local ok, value = pcall(RestApiGet, '/instances/' .. instances[1]['ID'] .. '/metadata/' .. name)
  if ok then
    return value
  end
  return nil
end

function OnStableSeries(seriesId, tags, metadata)
  local modality = tags['Modality'] or ''
  if not MODALITIES[modality] then
    return
  end
  if metadata['ModifiedFrom'] ~= nil or metadata['AnonymizedFrom'] ~= nil then
    return
  end
  if FirstInstanceMetadata(seriesId, 'RemoteAET') == NODE_AET then
    return
  end

  local answer = RestApiPost('/modalities/' .. TARGET .. '/store', DumpJson({
    Resources = { seriesId },
    Asynchronous = true,
  }))
  local job = (answer and ParseJson(answer)) or {}
  print('spine-node routing: series ' .. (tags['SeriesInstanceUID'] or seriesId) ..
        ' (' .. modality .. ') -> ' .. TARGET .. ', job ' .. (job['ID'] or 'not created'))
end
